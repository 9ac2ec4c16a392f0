"""MemoryPlan: the exact bill by component and its placement on GPU / pinned RAM / disk.

A pure function of (ModelConfig, inventory, weight scheme, HardwareInfo, limits). The engine
allocates its caches from the same numbers (num_kv_blocks, block_size, num_state_slots,
expert_slots_per_layer) and compares its measured peak with them after warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spillover.config import ModelConfig
from spillover.hw.info import HardwareInfo, fmt_bytes
from spillover.plan.formats import WeightScheme
from spillover.plan.inventory import EMBEDDINGS, LM_HEAD, ROUTED_EXPERTS, Inventory
from spillover.plan.speed import Prediction, Traffic, predict
from spillover.plan.workspace import activation_bytes

GiB = 1 << 30
MiB = 1 << 20
# CUDA context + cuBLAS state of a PyTorch process, rounded up; torch's allocator never sees it
# (docs/planning.md, "2. The bill")
CUDA_CONTEXT_BYTES = 800 * MiB
STAGING_CAP_BYTES = 2 * GiB
# prompt length the prefill speed is quoted at (or the context if shorter)
PREFILL_PROMPT_TOKENS = 8192
# cache / runtime entries of the tier tables, next to the weight components
KV_CACHE, LINEAR_STATE, ACTIVATIONS, STAGING, RUNTIME = (
    "kv_cache",
    "linear_state",
    "activations",
    "staging",
    "runtime",
)


@dataclass(frozen=True)
class Limits:
    context: int = 32768  # tokens per sequence the KV cache is sized for
    seqs: int = 1  # concurrent sequences
    token_budget: int = 2048  # tokens per forward pass (prefill chunk)
    block_size: int = 16  # tokens per KV block
    kv_dtype_bytes: int = 2
    model_dtype_bytes: int = 2  # activations and conv state
    ssm_state_dtype_bytes: int = 4  # Gated DeltaNet recurrent state is kept in fp32
    prompt_cache_slots: int = 0  # extra state slots for prompt-reuse checkpoints
    host_reserve_bytes: int | None = None  # RAM left to the OS and this process


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    config: ModelConfig
    hardware: HardwareInfo
    scheme: WeightScheme
    limits: Limits
    params_total: int
    params_active_per_token: int  # without the embedding table, with lm_head
    params_by_component: dict[str, int]
    weights_bytes: dict[str, int]
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    activation_bytes: int
    staging_bytes: int
    runtime_bytes: int  # CUDA context + allocator margin (not seen by torch's allocator)
    gpu_budget: int
    host_budget: int
    tiers: dict[str, dict[str, int]]  # gpu / host / disk -> component -> bytes
    block_size: int
    num_kv_blocks: int
    num_state_slots: int
    num_experts: int
    expert_slots_per_layer: int  # GPU slots of every MoE layer
    host_experts_per_layer: int
    dense_layers_on_gpu: int
    max_context: int
    max_seqs: int
    fits: bool
    verdict: str  # gpu | gpu+ram | ram | disk | no
    reasons: tuple[str, ...]
    predicted: Prediction
    suggestions: tuple[str, ...] = ()
    checkpoint_bytes: int | None = None  # download size, when read from headers
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights_total(self) -> int:
        return sum(self.weights_bytes.values())

    def tier_total(self, tier: str) -> int:
        return sum(self.tiers[tier].values())

    @property
    def gpu_torch_bytes(self) -> int:
        """What torch's allocator should peak at on the GPU (everything but the runtime entry)."""
        return sum(v for k, v in self.tiers["gpu"].items() if k != RUNTIME)


def state_bytes_per_sequence(cfg: ModelConfig, conv_dtype_bytes: int, ssm_dtype_bytes: int) -> int:
    """Exactly the engine's slots: conv [conv_dim, kernel-1] in the model dtype + ssm
    [Hv, Dk, Dv]."""
    conv = cfg.linear_conv_dim * max(cfg.linear_conv_kernel_dim - 1, 0) * conv_dtype_bytes
    ssm = (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
           * ssm_dtype_bytes)
    return len(cfg.linear_layers) * (conv + ssm)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gpu_runtime_bytes(vram_total: int) -> int:
    # allocator slack and fragmentation: a few large pre-allocated buffers keep it small
    return CUDA_CONTEXT_BYTES + max(256 * MiB, int(0.02 * vram_total))


def host_budget(hw: HardwareInfo, limits: Limits) -> int:
    reserve = limits.host_reserve_bytes
    if reserve is None:
        reserve = max(4 * GiB, int(0.1 * hw.ram_total))
    budget = hw.ram_total - reserve
    if hw.ram_available is not None:  # probed: other processes hold part of it
        budget = min(budget, hw.ram_available - GiB)
    return max(budget, 0)


class _Bill:
    """The sizes that do not depend on placement, shared by the plan and the limit searches."""

    def __init__(self, cfg: ModelConfig, inv: Inventory, scheme: WeightScheme,
                 limits: Limits) -> None:
        self.cfg, self.limits = cfg, limits
        self.weights = inv.bytes_by_component(scheme)
        self.weights_total = sum(self.weights.values())
        self.kv_per_token = cfg.kv_bytes_per_token(limits.kv_dtype_bytes)
        self.state_per_seq = state_bytes_per_sequence(cfg, limits.model_dtype_bytes,
                                                      limits.ssm_state_dtype_bytes)
        routed = inv.layer_bytes(scheme, ROUTED_EXPERTS)
        self.moe_layers = sorted(routed)
        e = max(cfg.num_experts, 1)
        self.expert_bytes = _ceil_div(sum(routed.values()), e * len(routed)) if routed else 0
        dense: dict[int, int] = {}
        for t in inv.tensors:
            if t.layer is not None and t.component != ROUTED_EXPERTS:
                dense[t.layer] = dense.get(t.layer, 0) + t.nbytes(scheme)
        self.layer_dense = [dense.get(i, 0) for i in sorted(dense)]
        self.global_dense = self.weights_total - sum(self.layer_dense) - sum(routed.values())
        self.global_dense -= self.weights.get(EMBEDDINGS, 0)
        self.largest_unit = max([*routed.values(), *self.layer_dense, 0])

    def kv_blocks(self, context: int, seqs: int) -> int:
        if not self.kv_per_token:
            return 0
        return seqs * _ceil_div(context, self.limits.block_size)

    def caches(self, context: int, seqs: int) -> tuple[int, int, int]:
        kv = self.kv_blocks(context, seqs) * self.limits.block_size * self.kv_per_token
        slots = seqs + self.limits.prompt_cache_slots if self.state_per_seq else 0
        act = activation_bytes(self.cfg, self.limits.token_budget, seqs,
                               self.limits.model_dtype_bytes)
        return kv, slots * self.state_per_seq, act


@dataclass(frozen=True)
class _Placement:
    kv: int
    state: int
    act: int
    staging: int
    caches_fit: bool  # KV + state + activations (+ staging) fit in the GPU budget
    layers: int  # dense layers on the GPU (in order)
    slots: int  # GPU expert slots per MoE layer
    emb_gpu: bool
    dense_gpu: int
    dense_host: int
    dense_disk: int
    host_experts: int
    disk_experts: int
    emb_where: str
    verdict: str


FITS = ("gpu", "gpu+ram", "ram")


def _place(bill: _Bill, gpu_budget: int, host: int, has_gpu: bool, context: int,
           seqs: int) -> _Placement:
    """Dense and caches on the GPU first, then expert slots, then RAM, then disk.

    The order, step by step: docs/planning.md, "3. Placement".
    """
    kv, state, act = bill.caches(context, seqs)
    e, n_moe = bill.cfg.num_experts, len(bill.moe_layers)
    emb = bill.weights.get(EMBEDDINGS, 0)
    n_layers = len(bill.layer_dense)
    per = bill.expert_bytes * n_moe

    def fill(room: int) -> tuple[int, int, bool, int]:
        if bill.global_dense > room:
            return 0, 0, False, 0
        used, layers = bill.global_dense, 0
        for b in bill.layer_dense:
            if used + b > room:
                break
            used, layers = used + b, layers + 1
        dense = bill.global_dense + sum(bill.layer_dense[:layers])
        slots = 0
        if layers == n_layers and n_moe:
            slots = e
            if bill.expert_bytes:
                slots = min(e, (room - dense) // (bill.expert_bytes * n_moe))
        all_in = (layers == n_layers and slots == (e if n_moe else 0)
                  and dense + slots * per + emb <= room)
        return layers, slots, all_in, dense

    room = gpu_budget - (kv + state + act) if has_gpu else -1
    staging = 0
    layers, slots, emb_gpu, dense_gpu = 0, 0, False, 0
    caches_fit = room >= 0
    if caches_fit:
        layers, slots, emb_gpu, dense_gpu = fill(room)
        if not emb_gpu and bill.weights_total - emb > room:
            # weights stream to the GPU during prefill: keep a double buffer for them
            staging = min(2 * bill.largest_unit, STAGING_CAP_BYTES)
            caches_fit = room - staging >= 0
            if caches_fit:
                layers, slots, emb_gpu, dense_gpu = fill(room - staging)
            else:
                layers, slots, emb_gpu, dense_gpu = 0, 0, False, 0
    gpu_ok = has_gpu and caches_fit
    host_room = host - (0 if has_gpu else kv + state + act)
    off_dense = sum(bill.layer_dense) + bill.global_dense - dense_gpu
    dense_host = min(off_dense, max(host_room, 0))
    host_room -= dense_host
    off_experts = e - slots if n_moe else 0
    host_experts = min(off_experts, max(host_room, 0) // per) if per else 0
    host_room -= host_experts * per
    emb_where = "gpu" if emb_gpu else ("host" if emb <= host_room else "disk")
    disk = (off_dense - dense_host + (off_experts - host_experts) * per
            + (emb if emb_where == "disk" else 0))
    on_host = dense_host + host_experts * per + (emb if emb_where == "host" else 0)
    if has_gpu and not caches_fit:
        verdict = "no"
    elif disk:
        verdict = "disk"
    elif on_host or not has_gpu:
        verdict = "gpu+ram" if has_gpu else "ram"
    else:
        verdict = "gpu"
    return _Placement(
        kv,
        state,
        act,
        staging if gpu_ok else 0,
        caches_fit,
        layers,
        slots,
        emb_gpu,
        dense_gpu,
        dense_host,
        off_dense - dense_host,
        host_experts,
        off_experts - host_experts,
        emb_where,
        verdict,
    )


def plan_memory(
    model: str, cfg: ModelConfig, inv: Inventory, scheme: WeightScheme, hw: HardwareInfo,
    limits: Limits
) -> MemoryPlan:
    bill = _Bill(cfg, inv, scheme, limits)
    gpu = hw.gpu
    runtime = gpu_runtime_bytes(gpu.vram_total) if gpu else 0
    gpu_budget = 0
    if gpu:
        avail = gpu.vram_free if gpu.vram_free is not None else gpu.vram_total
        gpu_budget = max(min(avail, gpu.vram_total) - runtime, 0)
    host = host_budget(hw, limits)
    reasons: list[str] = []
    context, seqs = min(limits.context, cfg.max_position), limits.seqs
    if limits.context > cfg.max_position:
        reasons.append(f"context capped at the model's maximum of {cfg.max_position} tokens")
    pl = _place(bill, gpu_budget, host, gpu is not None, context, seqs)
    tiers = _tiers(bill, pl)
    if gpu:
        tiers["gpu"].update(
            {
                KV_CACHE: pl.kv,
                LINEAR_STATE: pl.state,
                ACTIVATIONS: pl.act,
                STAGING: pl.staging,
                RUNTIME: runtime,
            }
        )
    else:
        tiers["host"].update({KV_CACHE: pl.kv, LINEAR_STATE: pl.state, ACTIVATIONS: pl.act})
    tiers = {t: {k: v for k, v in d.items() if v} for t, d in tiers.items()}
    if pl.verdict == "no":
        reasons.append(
            f"the KV cache ({fmt_bytes(pl.kv)}), state ({fmt_bytes(pl.state)}) and activations "
            f"({fmt_bytes(pl.act)}) for {context} tokens x {seqs} sequence(s), plus a streaming "
            f"buffer, exceed the GPU budget of {fmt_bytes(gpu_budget)}"
        )
    elif pl.verdict == "disk":
        vram = f"{fmt_bytes(gpu.vram_total)} VRAM + " if gpu else ""
        reasons.append(
            f"weights are {fmt_bytes(bill.weights_total)} ({scheme.name}), more than {vram}"
            f"{fmt_bytes(hw.ram_total)} RAM can hold ({fmt_bytes(gpu_budget)} + {fmt_bytes(host)} "
            "usable after the caches, CUDA runtime and OS reserve): "
            f"{fmt_bytes(sum(tiers['disk'].values()))} would be read from disk"
        )
    if hw.disk_free is not None and hw.disk_free < bill.weights_total:
        reasons.append(
            f"the model files ({fmt_bytes(bill.weights_total)}) need more disk than the "
            f"{fmt_bytes(hw.disk_free)} free at {hw.disk_path}"
        )

    def ok(c: int, s: int) -> bool:
        return _place(bill, gpu_budget, host, gpu is not None, c, s).verdict in FITS

    bs = limits.block_size
    max_context = _search(lambda c: ok(c * bs, seqs), cfg.max_position // bs) * bs
    max_seqs = _search(lambda s: ok(context, s), 4096)
    traffic = _traffic(cfg, bill, inv, pl, context, gpu is not None and pl.caches_fit, limits)
    chunk = min(limits.token_budget, min(context, PREFILL_PROMPT_TOKENS))
    params = inv.params_by_component()
    n_moe = len(bill.moe_layers)
    return MemoryPlan(
        model=model,
        config=cfg,
        hardware=hw,
        scheme=scheme,
        limits=limits,
        params_total=inv.total_params,
        params_active_per_token=_active_params(cfg, params),
        params_by_component=params,
        weights_bytes=bill.weights,
        kv_bytes_per_token=bill.kv_per_token,
        state_bytes_per_sequence=bill.state_per_seq,
        activation_bytes=pl.act,
        staging_bytes=pl.staging,
        runtime_bytes=runtime,
        gpu_budget=gpu_budget,
        host_budget=host,
        tiers=tiers,
        block_size=bs,
        num_kv_blocks=bill.kv_blocks(context, seqs),
        num_state_slots=(seqs + limits.prompt_cache_slots) if bill.state_per_seq else 0,
        num_experts=cfg.num_experts if n_moe else 0,
        expert_slots_per_layer=pl.slots,
        host_experts_per_layer=pl.host_experts,
        dense_layers_on_gpu=pl.layers,
        max_context=max_context,
        max_seqs=max_seqs,
        fits=pl.verdict in FITS,
        verdict=pl.verdict,
        reasons=tuple(reasons),
        predicted=predict(traffic, hw, chunk),
        extra={"context": context, "seqs": seqs},
    )


def _search(ok: Any, hi: int) -> int:
    """Largest n in [0, hi] with ok(n), ok monotone decreasing; 0 when even 1 fails."""
    if hi <= 0 or not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _tiers(bill: _Bill, pl: _Placement) -> dict[str, dict[str, int]]:
    """Split each weight component over the tiers from the unit counts of the placement."""
    per = bill.expert_bytes * len(bill.moe_layers)
    routed = {"gpu": pl.slots * per, "host": pl.host_experts * per, "disk": pl.disk_experts * per}
    tiers: dict[str, dict[str, int]] = {"gpu": {}, "host": {}, "disk": {}}
    dense_total = sum(bill.layer_dense) + bill.global_dense
    for comp, size in bill.weights.items():
        if comp == ROUTED_EXPERTS:
            total = sum(routed.values())
            for t in routed:  # expert_bytes is rounded up: scale to the exact component total
                tiers[t][comp] = size * routed[t] // total if total else 0
        elif comp == EMBEDDINGS:
            tiers[pl.emb_where][comp] = size
        else:  # dense components spill in proportion to the dense bytes off the GPU
            g = size * pl.dense_gpu // dense_total if dense_total else 0
            d = size * pl.dense_disk // dense_total if dense_total else 0
            tiers["gpu"][comp], tiers["disk"][comp], tiers["host"][comp] = g, d, size - g - d
    return tiers


def _active_params(cfg: ModelConfig, params: dict[str, int]) -> int:
    dense = sum(v for k, v in params.items() if k not in (ROUTED_EXPERTS, EMBEDDINGS))
    routed = params.get(ROUTED_EXPERTS, 0)
    if routed and cfg.num_experts:
        routed = routed * cfg.num_experts_per_tok // cfg.num_experts
    return dense + routed


def _traffic(
    cfg: ModelConfig, bill: _Bill, inv: Inventory, pl: _Placement, context: int, gpu_ok: bool,
    limits: Limits
) -> Traffic:
    n_moe, e, k = len(bill.moe_layers), max(cfg.num_experts, 1), cfg.num_experts_per_tok
    per = bill.expert_bytes * n_moe
    touched = k / e if n_moe else 0.0  # uniform routing: each expert is hit with probability k/E
    chunk = min(limits.token_budget, min(context, PREFILL_PROMPT_TOKENS))
    # experts a chunk needs at least once
    chunk_hit = 1.0 - (1.0 - touched) ** chunk if n_moe else 0.0
    caches = bill.kv_per_token * context + 2 * bill.state_per_seq  # KV read; state read + written
    row = cfg.hidden_size * limits.model_dtype_bytes  # one embedding row, or as a tied lm_head
    row = bill.weights.get(EMBEDDINGS, row) if cfg.tie_word_embeddings else row  # the whole table
    gpu_b = pl.dense_gpu + pl.slots * per * touched + (caches + row if gpu_ok else 0)
    host_b = pl.dense_host + pl.host_experts * per * touched + (0 if gpu_ok else caches + row)
    disk_b = pl.dense_disk + pl.disk_experts * per * touched
    params = inv.params_by_component()
    active_no_head = _active_params(cfg, params) - params.get(LM_HEAD, 0)
    p = min(context, PREFILL_PROMPT_TOKENS)
    # QK^T and PV, mean position
    attn = 4 * len(cfg.attention_layers) * cfg.num_heads * cfg.head_dim * p / 2
    return Traffic(
        gpu_bytes=gpu_b,
        host_bytes=host_b,
        disk_bytes=disk_b,
        host_stream_bytes_per_chunk=pl.dense_host + pl.host_experts * per * chunk_hit,
        disk_bytes_per_chunk=pl.dense_disk + pl.disk_experts * per * chunk_hit,
        flops_per_token=2 * active_no_head + attn,
        num_layers=cfg.num_layers,
    )
