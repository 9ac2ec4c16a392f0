"""The planner's CPU decode prediction for the demo model, held within 25 % of its measured
decode on this machine: the links (GEMV rate, engine step and layer overheads) are measured in
the same test, as `spillover probe --measure` measures them, so a slow or busy machine moves
the prediction and the measurement together. A busy CI box gets three rounds to find one in
which both saw the same machine."""

from __future__ import annotations

import torch

from spillover.bench.overhead import decode_step_seconds, measure_decode_overhead
from spillover.engine.memory import device_hardware, loaded_weight_bytes
from spillover.hw.probe import apply_measurements, cpu_gemv_rate
from spillover.llm import LLM
from spillover.plan.engine_cache import predict_loaded_decode

PROMPT_TOKENS = 64
STEPS = 16
TOLERANCE = 0.25
ROUNDS = 3


def test_cpu_decode_prediction_within_25_percent_of_measured() -> None:
    llm = LLM(device="cpu")  # the demo model, loaded as `serve` loads it on the CPU
    cfg, engine = llm.config, llm.engine
    prompt = [(13 * i + 5) % cfg.vocab_size for i in range(PROMPT_TOKENS)]
    weights = loaded_weight_bytes(llm.model)
    dtype_bytes = torch.empty(0, dtype=llm.dtype).element_size()
    decode_step_seconds(engine, prompt, 2)  # warm-up
    seen = []
    for _ in range(ROUNDS):
        gemv = cpu_gemv_rate(128 << 20)
        # the fixed costs of layers of the demo's own shape (2 and 6 of them, synthetic weights),
        # extrapolated to its 30 layers
        links = {"cpu_gemv": gemv, **measure_decode_overhead(gemv, cfg=cfg, layers=(2, 6))}
        hw = apply_measurements(device_hardware(torch.device("cpu")), links)
        predicted = predict_loaded_decode(cfg, hw, weights, PROMPT_TOKENS + STEPS // 2,
                                          dtype_bytes).decode_tok_s
        measured = 1.0 / decode_step_seconds(engine, prompt, STEPS)
        seen.append(f"predicted {predicted:.1f} tok/s, measured {measured:.1f} tok/s "
                    f"(GEMV {gemv / 1e9:.1f} GB/s, step {links['cpu_step_s'] * 1e3:.2f} ms, "
                    f"layer {links['cpu_layer_s'] * 1e3:.2f} ms)")
        if abs(predicted / measured - 1) <= TOLERANCE:
            print(seen[-1])
            return
    raise AssertionError("CPU decode prediction off by more than 25 %:\n" + "\n".join(seen))
