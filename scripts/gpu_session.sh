#!/usr/bin/env bash
# One device call that checks and measures what issues 18 and 19 ask for, in priority order,
# with llama.cpp built meanwhile and run at the end on the same card. Run on the GPU machine from
# the repository root, with `.whl` (fla-core, gguf, einops wheels) and `.peer` (prepared by
# ../shared/peerbench/prepare.sh) carried; logs and JSON land in $OUT. A fresh machine spends
# its first minutes building the synthetic 80B model and compiling Triton kernels: each bench
# below is given room for that. With every step at its limit the call runs past the device's
# 600 s: PROFILES=0 leaves the two profiles out.
set -u
: "${OUT:?set OUT to a folder for the logs}"
export PYTHONUNBUFFERED=1
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/times.log"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
B="python -m spillover -v bench Qwen/Qwen3-Next-80B-A3B-Instruct --synthetic --quant int4"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/smi.txt"
(PLACEMENTS=none nice -n 19 bash .peer/device_run.sh > "$OUT/peer_build.log" 2>&1) & PB=$!
timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_fused_glue.py \
  tests/kernels/test_fused_small.py tests/kernels/test_gdn_decode.py \
  tests/kernels/test_paged_attention.py > "$OUT/kernels.log" 2>&1; t "kernel tests rc=$?"
timeout 170 $B --prompt-lens 512,8192 --batches 1,16 --decode-tokens 32 \
  --max-num-batched-tokens 8192 --json "$OUT/bench_vram.json" > "$OUT/bench_vram.log" 2>&1
t "bench vram rc=$?"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 170 $B --gpu-memory 32GiB \
  --cpu-memory 60GB --expert-misses mapped --prompt-lens 512,8192 --batches 1,8 \
  --decode-tokens 16 --max-num-batched-tokens 8192 --json "$OUT/bench_32g.json" \
  > "$OUT/bench_32g.log" 2>&1; t "bench 32g mapped rc=$?"
if [ "${PROFILES:-1}" != 0 ]; then
  timeout 60 python bench/decode_profile.py --layers 8 --batch 1 --steps 20 \
    --json "$OUT/profile8.json" > "$OUT/profile8.log" 2>&1; t "decode profile rc=$?"
  timeout 60 python bench/decode_profile.py --layers 8 --prefill --prompt-len 8192 \
    --json "$OUT/profile_prefill.json" > "$OUT/profile_prefill.log" 2>&1
  t "prefill profile rc=$?"
fi
t "waiting for the peer build"; wait $PB; t "peer build rc=$?"
PLACEMENTS="a c" PP=512,8192 TG=64 REPS=1 timeout 120 bash .peer/device_run.sh \
  > "$OUT/peer.log" 2>&1; t "peer rc=$?"
