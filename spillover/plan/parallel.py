"""The bill of one GPU when a model is split over several: tensor parallel within a node, pipeline
parallel across nodes, as vLLM and SGLang split it. Pure arithmetic on a MemoryPlan's bill.

The single-GPU plan (plan_memory) stays the source of every size: weights by component, KV bytes
per token, linear-attention state per sequence, activations and the CUDA runtime. This module only
divides them the way a tensor-parallel engine shards a model:
- every projection, expert and the vocabulary are split over the TP ranks (vLLM's column/row
  parallel layers, VocabParallelEmbedding); routers and norms are replicated;
- KV heads are split while there are enough of them, else each rank keeps one (replicated);
- layers are split over the pipeline stages; the embedding and the LM head sit on one stage each.
"""

from __future__ import annotations

from dataclasses import dataclass

from spillover.config import ModelConfig
from spillover.hw.info import HardwareInfo, fmt_bytes
from spillover.plan.inventory import EMBEDDINGS, LM_HEAD, NORMS, ROUTED_EXPERTS, ROUTER
from spillover.plan.memory import MemoryPlan
from spillover.plan.speed import Traffic, predict

TP_SIZES = (1, 2, 4, 8)  # GPUs of one node a model is split over; powers of two divide head counts
# Components every TP rank holds whole (vLLM: ReplicatedLinear gate, RMSNorm weights).
REPLICATED = (ROUTER, NORMS)
# One all-reduce after attention and one after the MLP, per layer, per decode step: an assumed
# cost, not measured here (docs/deploy.md).
ALLREDUCE_S = 15e-6
# Experts whose per-rank slice of the intermediate dimension is narrower than this run as thin
# GEMMs under TP; expert parallelism keeps each expert whole on one rank instead (vLLM
# --enable-expert-parallel, SGLang --ep-size).
EP_MIN_SLICE = 512


@dataclass(frozen=True)
class ShardBill:
    """What one GPU holds under tp x pp sharding (bytes)."""

    tp: int
    pp: int
    weights: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    activations: int  # not divided: hidden states are whole on every rank after each all-reduce
    runtime: int  # CUDA context + allocator margin of one process


@dataclass(frozen=True)
class ParallelPlan:
    """A model split over tp x pp GPUs (x dp replicas) of the named kind, with the room left for
    the KV cache under an engine's memory fraction."""

    tp: int
    pp: int  # nodes when multi-node: pipeline stages
    dp: int  # replicas of the tp x pp group on the GPUs left over
    expert_parallel: bool
    memory_fraction: float  # of each GPU's memory the engine may take
    bill: ShardBill
    kv_room: int  # per GPU, after weights, activations, runtime and the state slots
    max_context: int  # tokens of one sequence the KV room holds, capped at the model's maximum
    fits: bool  # the requested context fits
    decode_tok_s: float
    prefill_tok_s: float
    reasons: tuple[str, ...]

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


def tp_allowed(cfg: ModelConfig, tp: int) -> bool:
    """Whether the head counts divide over `tp` ranks (vLLM and SGLang refuse otherwise)."""
    heads = [cfg.num_heads]
    if cfg.linear_layers:
        heads += [cfg.linear_num_key_heads, cfg.linear_num_value_heads]
    if any(h % tp for h in heads):
        return False
    kv = cfg.num_kv_heads
    return kv % tp == 0 or tp % kv == 0


def shard_bill(plan: MemoryPlan, tp: int, pp: int = 1) -> ShardBill:
    cfg = plan.config
    w = plan.weights_bytes
    replicated = sum(w.get(c, 0) for c in REPLICATED)
    emb, head = w.get(EMBEDDINGS, 0), w.get(LM_HEAD, 0)
    # one stage holds both; across stages the first has the embedding, the last the LM head
    ends = emb + head if pp == 1 else max(emb, head)
    layered = plan.weights_total - replicated - emb - head
    weights = _ceil_div(layered, tp * pp) + _ceil_div(replicated, pp) + _ceil_div(ends, tp)
    kv_heads = max(cfg.num_kv_heads, 1)
    kv_rank_heads = max(1, kv_heads // tp)  # tp > kv heads: each rank keeps one head
    kv = _ceil_div(plan.kv_bytes_per_token * kv_rank_heads, kv_heads * pp)
    state = _ceil_div(plan.state_bytes_per_sequence, tp * pp)
    return ShardBill(tp, pp, weights, kv, state, plan.activation_bytes, plan.runtime_bytes)


def expert_parallel_helps(cfg: ModelConfig, tp: int) -> bool:
    return (cfg.is_moe and tp > 1 and cfg.num_experts % tp == 0
            and cfg.moe_intermediate_size // tp < EP_MIN_SLICE)


def plan_parallel(plan: MemoryPlan, hw: HardwareInfo, tp: int, *, pp: int = 1, dp: int = 1,
                  memory_fraction: float = 0.9) -> ParallelPlan:
    """`plan` (made for one GPU of `hw`) split over tp x pp GPUs of the same kind."""
    gpu = hw.gpu
    if gpu is None:
        raise ValueError("a parallel plan needs a GPU")
    cfg = plan.config
    seqs, context = plan.limits.seqs, int(plan.extra.get("context", plan.limits.context))
    b = shard_bill(plan, tp, pp)
    budget = int(gpu.vram_total * memory_fraction)
    room = budget - b.weights - b.activations - b.runtime - seqs * b.state_bytes_per_sequence
    bs = plan.block_size
    tokens = room // b.kv_bytes_per_token if b.kv_bytes_per_token else cfg.max_position
    max_context = max(0, min(cfg.max_position, tokens) // bs * bs)
    fits = room > 0 and max_context >= min(context, cfg.max_position)
    reasons: list[str] = []
    if room <= 0:
        reasons.append(
            f"{fmt_bytes(b.weights)} of weights per GPU, plus activations and the CUDA runtime, "
            f"exceed {memory_fraction:.2f} x {fmt_bytes(gpu.vram_total)}"
        )
    elif not fits:
        reasons.append(f"the KV room per GPU ({fmt_bytes(room)}) holds {max_context} tokens, "
                       f"fewer than the {context} asked for")
    dec, pre = _speed(plan, hw, b)
    return ParallelPlan(tp, pp, dp, expert_parallel_helps(cfg, tp), memory_fraction, b,
                        max(room, 0), max_context, fits, dec, pre, tuple(reasons))


def smallest_parallel(plan: MemoryPlan, hw: HardwareInfo, gpus_per_node: int, nodes: int = 1,
                      memory_fraction: float = 0.9) -> ParallelPlan | None:
    """The fewest GPUs per node (TP size) that hold the model at the plan's context, or None.
    Across nodes TP spans the whole node and each node is a pipeline stage (vLLM's advice)."""
    sizes = [gpus_per_node] if nodes > 1 else [t for t in TP_SIZES if t <= gpus_per_node]
    for tp in sizes:
        if not tp_allowed(plan.config, tp):
            continue
        p = plan_parallel(plan, hw, tp, pp=nodes, dp=1 if nodes > 1 else gpus_per_node // tp,
                          memory_fraction=memory_fraction)
        if p.fits:
            return p
    return None


def _speed(plan: MemoryPlan, hw: HardwareInfo, b: ShardBill) -> tuple[float, float]:
    """Decode and prefill tok/s: the same link model as the single-GPU plan. The TP ranks of a
    stage read their shares at once; pipeline stages run one after another, so a token pays every
    stage. Plus two all-reduces per layer."""
    cfg = plan.config
    w = plan.weights_bytes
    routed = w.get(ROUTED_EXPERTS, 0)
    touched_routed = routed * cfg.num_experts_per_tok // cfg.num_experts if cfg.num_experts else 0
    # a decode token reads the dense weights, its experts, the KV of the context and the state
    active = plan.weights_total - w.get(EMBEDDINGS, 0) - routed + touched_routed
    context = int(plan.extra.get("context", plan.limits.context))
    per_token = (active / b.tp + b.pp * (b.kv_bytes_per_token * context
                                          + 2 * b.state_bytes_per_sequence))
    traffic = Traffic(gpu_bytes=per_token, host_bytes=0.0, disk_bytes=0.0,
                      host_stream_bytes_per_chunk=0.0, disk_bytes_per_chunk=0.0,
                      flops_per_token=2 * plan.params_active_per_token / b.tp,
                      num_layers=cfg.num_layers)
    chunk = plan.predicted.prefill_chunk_tokens or plan.limits.token_budget
    p = predict(traffic, hw, chunk)
    comm = 2 * cfg.num_layers * ALLREDUCE_S if b.tp > 1 else 0.0
    decode = 1.0 / (1.0 / p.decode_tok_s + comm) if p.decode_tok_s else 0.0
    return decode, p.prefill_tok_s


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
