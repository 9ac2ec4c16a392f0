"""The fixed cost of a CPU decode step, measured through the engine: what `spillover probe
--measure` records as LinkRates.cpu_step_s and cpu_layer_s for the speed model.

Two synthetic models of the same small shape with 2 and 10 layers decode one sequence; the step
time is fitted as t(L) = step + L * layer + weight_bytes(L) / gemv_rate, with the weights' read
time taken out at the measured GEMV rate, so that what is left is what bytes do not explain:
Python, scheduling, sampling, norms, rotary and attention over a short context.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from spillover.config import ModelConfig

# small enough that the weights' reads are a minor share of a step; attention with the head
# size of most models (64, 128 are common) over PROMPT_TOKENS positions
OVERHEAD_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
LAYERS = (2, 10)
PROMPT_TOKENS = 64
DECODE_STEPS = 24


def decode_step_seconds(engine: Any, prompt: list[int], steps: int) -> float:
    """A low percentile (the 25th) of the engine's decode step times for one sequence: the cost of
    a step with as little interference from other processes as this machine gives."""
    from spillover.engine.params import SamplingParams

    rid = f"overhead-{time.monotonic_ns()}"
    engine.add_request(rid, prompt, SamplingParams(max_tokens=steps + 1, temperature=0,
                                                   ignore_eos=True))
    engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 4]


def _weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes a decode step reads: every parameter but the embedding table (one row of it), which
    a tied lm_head reads whole."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if tied or "embed_tokens" not in n)


def measure_decode_overhead(gemv_rate: float, threads: int | None = None,
                            cfg: ModelConfig | None = None,
                            layers: tuple[int, int] = LAYERS) -> dict[str, float]:
    """{"cpu_step_s": s, "cpu_layer_s": s} of engine decode on the CPU (float32, eager), for
    layers of OVERHEAD_CONFIG's shape, or of `cfg`'s (a model's own: its head count and widths
    set what a layer's small ops cost)."""
    from spillover.bench.synthetic import build_synthetic, with_layers
    from spillover.llm import LLM

    if threads:
        torch.set_num_threads(threads)
    base = cfg if cfg is not None else ModelConfig.from_hf(OVERHEAD_CONFIG)
    prompt = [(7 * i + 3) % base.vocab_size for i in range(PROMPT_TOKENS)]
    step: dict[int, float] = {}
    nbytes: dict[int, int] = {}
    for n in layers:
        cfg = with_layers(base, n)
        model = build_synthetic(cfg, "cpu", torch.float32, quant="bf16", seed=n)
        llm = LLM.from_model(model, cfg, device="cpu", dtype=torch.float32, max_num_seqs=1,
                             max_model_len=PROMPT_TOKENS + DECODE_STEPS + 8)
        decode_step_seconds(llm.engine, prompt, 4)  # warm-up: kernel choices, allocator
        step[n] = decode_step_seconds(llm.engine, prompt, DECODE_STEPS)
        nbytes[n] = _weight_bytes(model, base.tie_word_embeddings)
        del llm, model
    lo, hi = layers
    reads = {n: nbytes[n] / gemv_rate for n in layers}
    layer = max((step[hi] - reads[hi] - step[lo] + reads[lo]) / (hi - lo), 0.0)
    fixed = max(step[lo] - reads[lo] - lo * layer, 0.0)
    return {"cpu_step_s": fixed, "cpu_layer_s": layer}
