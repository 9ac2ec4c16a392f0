#!/bin/sh
# Entrypoint of the spillover image: the API key and the hub token arrive as compose / swarm
# secrets (files under /run/secrets), never as values in the image, the compose file or
# `docker inspect`; they are exported for this process only, then the command runs.
set -eu
if [ -s /run/secrets/api_key ]; then
    SPILLOVER_API_KEY="$(cat /run/secrets/api_key)"
    export SPILLOVER_API_KEY
fi
if [ -s /run/secrets/hf_token ]; then
    HF_TOKEN="$(cat /run/secrets/hf_token)"
    export HF_TOKEN
fi
exec "$@"
