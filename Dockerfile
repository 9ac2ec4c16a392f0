# syntax=docker/dockerfile:1
# spillover for NVIDIA GPU boxes: the OpenAI-compatible server with the demo model baked in.
#   docker build -t spillover:0.1.0 .      then   docker compose up -d   (compose.yaml)
# Checked without Docker by tests/unit/test_dockerfile.py (docs/deploy.md lists the checklist);
# building and running the image needs a machine with Docker and the NVIDIA Container Toolkit.

# The CUDA base flavour (cudart + the forward-compatibility driver), not -runtime: the torch wheel
# brings its own cuBLAS / cuDNN / NCCL, and -runtime would hold them twice (the 50 GB images).
ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- build: the venv, plus Triton's one compiled host module --------------------------------
FROM ${CUDA_BASE} AS build
# CUDA 13.0 wheels cover sm_90 (H100/H200) and sm_120 (RTX 50xx, RTX PRO 6000) alike.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# the CUDA forward-compatibility driver of CUDA_BASE's version: a libcuda.so.1 for the build only
ARG CUDA_COMPAT=cuda-compat-13-0
ENV DEBIAN_FRONTEND=noninteractive \
    TRITON_CACHE_DIR=/opt/spillover/triton-cache \
    TRITON_LIBCUDA_PATH=/usr/lib/x86_64-linux-gnu
# gcc and python3-dev compile Triton's cuda_utils module below; they stay in this stage, as does
# the compatibility driver.
# Unpinned apt packages (DL3008): the base image tag pins the distribution, and Ubuntu removes
# superseded versions from its archive, so exact pins break later builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    "${CUDA_COMPAT}" \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/spillover/src
COPY pyproject.toml ./
COPY spillover ./spillover
COPY scripts ./scripts
# The same commands as scripts/setup.sh (one list: scripts/install.sh), into the image's venv;
# the gpu extra adds Triton and flash-linear-attention, the server extra the HTTP API. The pip
# cache is a build cache mount, so a rebuild after a code change does not download torch again.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/spillover/venv \
 && . /opt/spillover/venv/bin/activate \
 && TORCH_INDEX="${TORCH_INDEX}" bash scripts/install.sh "server,gpu"
# Triton compiles one C module (cuda_utils) the first time a kernel launches, which would need a
# compiler in the final image. Build it here into the cache the final image ships: its cache key
# is the source plus TRITON_LIBCUDA_PATH, where the NVIDIA runtime mounts libcuda.so.1; the CUDA
# forward-compatibility library stands in for it during the build only.
RUN ln -sf /usr/local/cuda/compat/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
 && ldconfig \
 && /opt/spillover/venv/bin/python -c \
    "from triton.backends.nvidia.driver import CudaUtils; CudaUtils()" \
 && rm /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
 && test -n "$(ls -A /opt/spillover/triton-cache)"

# ---- final: Python, the venv, the source it was installed from; no compiler ------------------
FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
    PATH=/opt/spillover/venv/bin:$PATH \
    TRITON_CACHE_DIR=/opt/spillover/triton-cache \
    TRITON_LIBCUDA_PATH=/usr/lib/x86_64-linux-gnu \
    HF_HOME=/home/spillover/.cache/huggingface
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 spillover \
 && mkdir -p /home/spillover/.cache/huggingface \
 && chown -R spillover:spillover /home/spillover/.cache
# the editable install points at /opt/spillover/src: the same path in both stages
COPY --from=build --chown=spillover:spillover /opt/spillover /opt/spillover
# numeric, so that the runtime knows it is not root without reading /etc/passwd
USER 10001:10001
WORKDIR /home/spillover
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)"]
ENTRYPOINT ["/opt/spillover/src/scripts/docker-entrypoint.sh"]
# With no MODEL, `spillover serve` serves the built-in demo model (no download).
CMD ["spillover", "serve", "--host", "0.0.0.0", "--port", "8000"]
