#!/usr/bin/env bash
# Serving latency on a GPU machine without the demo GGUF: random weights of the SmolLM2-135M config plus the demo
# tokenizer saved beforehand (here: python -c "from spillover.models.registry import resolve_model, load_tokenizer;
# load_tokenizer(resolve_model(None)).save_pretrained('.gpu_assets/smol_tok')"), served by `spillover serve`.
set -e
python3 - <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "bench")
from synthetic import catalog_folder
folder = catalog_folder("HuggingFaceTB/SmolLM2-135M-Instruct", Path("/tmp/synth"))
for f in Path(".gpu_assets/smol_tok").iterdir():
    shutil.copy(f, folder / f.name)
print(folder)
PY
F=$(ls -d /tmp/synth/*)
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -m spillover "$@"\n' > /tmp/bin/spillover; chmod +x /tmp/bin/spillover; export PATH=/tmp/bin:$PATH
python3 bench/serve_latency.py --serve-args "$F --device cuda --dtype bfloat16 --max-num-seqs 32" --input-words 40 --output-len 64
