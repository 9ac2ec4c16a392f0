"""Synthetic models: any config with random weights, built directly in the format it is served in.

Speed depends on shapes and formats, not on values, so a random model of a known config shows what
the real one will do before anything is downloaded. The model is built on `meta` and every
parameter is then created where it lives and as it is served: quantized linears and stacked
experts are random codes with scales (never a float copy of the experts, which for an 80B MoE would
not fit in RAM), layer by layer; experts are created on the CPU (tiered placement may keep them
there), the rest on `device`, and `move_model` finishes the placement as loading does.

Values are chosen so that activations stay finite and non-degenerate at any depth: float matrices
and dequantized codes have std 0.02 (the usual initializer range), norms multiply by about 1.
`routing_skew` makes routing non-uniform, the way real routers favour some experts.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spillover.catalog import get_config
from spillover.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from spillover.layers.linear import Linear
from spillover.layers.linear_attn import GatedDeltaNet
from spillover.layers.norm import GatedRMSNorm, RMSNorm
from spillover.models.causal_lm import CausalLM
from spillover.offload.bank import ResidentExpertBank
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight, QuantFormat
from spillover.weights.build import load_policy, move_model
from spillover.weights.loader import materialize_buffers
from spillover.weights.quantize import QuantPolicy
from spillover.weights.resolve import META, build_model

log = logging.getLogger("spillover.bench")

STD = 0.02  # std of every random matrix, float or dequantized (the usual initializer range)
FLOAT_QUANTS = ("auto", "bf16", "none", None)  # no quantization: float weights in the model dtype
# Random bytes come in chunks of this many, each from its own generator (seeded by name and
# index), so threads fill one tensor in parallel and the result does not depend on their number.
CHUNK_BYTES = 16 << 20
# Random FP8 codes have this std (e4m3 reaches 448); the block scale maps it to STD.
FP8_CODE_STD = 64.0


def load_synthetic_config(source: str | Path) -> ModelConfig:
    """The config of a catalog model (hub id or loose name, spillover.catalog), a config.json file,
    or a folder holding one."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return ModelConfig.from_hf(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    _, cfg = get_config(str(source))
    return ModelConfig.from_hf(cfg)


def with_layers(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """`cfg` with `num_layers` layers and the same layer pattern (layer types and MoE/dense MLPs,
    continued periodically). A hybrid model cut below its period (Qwen3-Next: full attention on
    every 4th layer) keeps both kinds: its last layer becomes full attention, so that the KV cache
    and the linear-attention state are both exercised."""
    if num_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {num_layers}")
    if num_layers == cfg.num_layers:
        return cfg

    def cycle(seq: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(seq[i % len(seq)] for i in range(num_layers)) if seq else seq

    types = cycle(cfg.layer_types)
    if cfg.is_hybrid and FULL_ATTENTION not in types and LINEAR_ATTENTION in types:
        types = (*types[:-1], FULL_ATTENTION)
        log.info("--layers %d: layer %d made full attention (too few layers for the pattern's)",
                 num_layers, num_layers - 1)
    return replace(cfg, num_layers=num_layers, layer_types=types, moe_layers=cycle(cfg.moe_layers))


def synthetic_policy(quant: str | None, group_size: int, dtype: torch.dtype) -> QuantPolicy | None:
    """The loader's policy for a `--quant` choice (spillover.weights.build.load_policy: router,
    norms, embeddings, lm_head stay float); None for float weights. "auto" means int4 here: the
    format the planner defaults to for models that do not fit."""
    if quant in FLOAT_QUANTS[1:]:
        return None
    if quant == "native":
        raise ValueError("quant 'native' keeps a GGUF file's blocks; a synthetic model has none")
    return load_policy(quant or "int4", group_size, dtype)


def build_synthetic(
    cfg: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    quant: str | None = "int4",
    group_size: int = 128,
    seed: int = 0,
    *,
    num_layers: int | None = None,
    routing_skew: float = 0.0,
    record: dict[str, str] | None = None,
) -> CausalLM:
    """A CausalLM of `cfg` with random weights in their final format, on `device`.

    quant: a `--quant` choice (int4, int8, fp8, int4-experts; bf16 / none for float weights;
    auto = int4). num_layers: `with_layers`. routing_skew: 0 routes uniformly; s > 0 scales expert
    e's router row by exp(s * z_e), z_e ~ N(0, 1) drawn per layer, so high-variance experts win the
    top-k more often (`routing_concentration` measures the result). record, when given, receives
    {module or bank projection: "format (reason)"} as `quantize_model` reports it.
    """
    device = torch.device(device)
    if num_layers is not None:
        cfg = with_layers(cfg, num_layers)
    policy = synthetic_policy(quant, group_size, dtype)
    model = build_model(cfg, META, dtype)
    pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
    filler = _Filler(seed, policy, device, dtype, record if record is not None else {}, pool)
    with torch.no_grad(), pool:
        for name, module in model.named_modules():  # module order: embeddings, then layer by layer
            filler.fill(name, module)
            if routing_skew and name.endswith("mlp.gate") and isinstance(module, Linear):
                gen = filler.generator(f"{name}.skew", torch.device("cpu"))
                skew_router(module.weight, routing_skew, gen)
        materialize_buffers(model, device, zero=True)
    log.info("synthetic %s: %d layers, quant %s, on %s", cfg.model_type, cfg.num_layers, quant,
             device)
    return move_model(model, device)


def skew_router(weight: torch.Tensor, skew: float, gen: torch.Generator) -> None:
    """Scale router rows [E, H] by exp(skew * z_e): expert e's logits get that much more spread."""
    z = torch.randn(weight.shape[0], generator=gen)
    weight.mul_(torch.exp(skew * z).to(weight.device, weight.dtype)[:, None])


def routing_concentration(
    model: nn.Module, tokens: int = 1024, top_fraction: float = 0.1, seed: int = 0
) -> float | None:
    """Share of routed (token, expert) pairs that go to each layer's `top_fraction` most-chosen
    experts, averaged over MoE layers, for random unit-RMS hidden states (uniform routing gives
    about `top_fraction`); None for a dense model. An estimate: real hidden states are not
    isotropic."""
    from spillover.layers.moe import SparseMoE

    shares = []
    for mod in model.modules():
        if not isinstance(mod, SparseMoE):
            continue
        w = mod.gate.weight
        gen = torch.Generator(device=w.device).manual_seed(seed)
        x = torch.randn(tokens, w.shape[1], generator=gen, device=w.device, dtype=torch.float32)
        ids = torch.topk(x @ w.float().T, mod.top_k, dim=-1).indices
        counts = torch.bincount(ids.flatten(), minlength=w.shape[0]).sort(descending=True).values
        top = max(1, round(top_fraction * w.shape[0]))
        shares.append(float(counts[:top].sum()) / float(counts.sum()))
    return sum(shares) / len(shares) if shares else None


# ---- filling ------------------------------------------------------------------------------------
class _Filler:
    """Gives every meta parameter of one module its random value, in the policy's format."""

    def __init__(
        self,
        seed: int,
        policy: QuantPolicy | None,
        device: torch.device,
        dtype: torch.dtype,
        record: dict[str, str],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.seed, self.policy, self.device, self.dtype = seed, policy, device, dtype
        self.record, self.pool = record, pool
        self.done: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its filled one (ties)

    def generator(self, name: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(
            zlib.crc32(f"{self.seed}:{name}".encode())
        )

    def fill(self, name: str, module: nn.Module) -> None:
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in self.done:  # a tie (lm_head = embeddings) filled before
                setattr(module, pname, self.done[id(p)])
        if isinstance(module, ResidentExpertBank):
            for slot in ("w13", "w2"):
                self._bank_slot(name, module, slot)
        elif isinstance(module, Linear) and module.weight.is_meta:
            self._linear(name, module)
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                self._set(
                    module, pname, p, self._float(f"{name}.{pname}", module, pname, p, self.device)
                )

    def _set(self, module: nn.Module, pname: str, old: nn.Parameter, new: torch.Tensor) -> None:
        param = self.done[id(old)] = nn.Parameter(new, requires_grad=False)
        setattr(module, pname, param)

    def _float(
        self, full: str, module: nn.Module, pname: str, p: nn.Parameter, device: torch.device
    ) -> torch.Tensor:
        """A float parameter: matrices N(0, STD), norms about 1, Gated DeltaNet decays as
        initialised upstream (A = 1..16, dt_bias = 1), depthwise convolutions as torch does."""
        gen = self.generator(full, device)
        t = torch.empty(p.shape, dtype=p.dtype, device=device)
        if isinstance(module, RMSNorm | GatedRMSNorm):
            offset = getattr(module, "offset", 0.0)  # zero-centred norms multiply by (1 + w)
            return t.normal_(1.0 - offset, STD, generator=gen)
        if isinstance(module, GatedDeltaNet) and pname == "A_log":
            return t.uniform_(1.0, 16.0, generator=gen).log_()
        if isinstance(module, GatedDeltaNet) and pname == "dt_bias":
            return t.fill_(1.0)
        if isinstance(module, nn.Conv1d):
            bound = 1.0 / math.sqrt(p[0].numel())
            return t.uniform_(-bound, bound, generator=gen)
        return t.normal_(0.0, STD, generator=gen)

    def _format_for(self, full: str) -> tuple[str, str]:
        if self.policy is None:
            return "keep", "float weights"
        return self.policy.format_for(full)

    def _linear(self, name: str, module: Linear) -> None:
        fmt, why = self._format_for(name)
        if fmt == "keep":
            self.record[name] = f"dense ({why})"
            return  # filled as a float parameter by `fill`
        assert self.policy is not None
        packed, why = random_format(
            (module.out_features, module.in_features),
            fmt,
            why,
            self.policy,
            self.dtype,
            self._bytes_filler(name, self.device),
            self.generator(f"{name}.scales", self.device),
        )
        module.set_format(packed, self.device)
        self.record[name] = f"{packed.name} ({why})"

    def _bank_slot(self, name: str, bank: ResidentExpertBank, slot: str) -> None:
        full = f"{name}.{slot}"
        param: nn.Parameter = getattr(bank, slot)
        if not param.is_meta:
            return
        cpu = torch.device("cpu")  # experts start in RAM: a tiered placement may keep them there
        fmt, why = self._format_for(full)
        if fmt == "keep":
            self._set(bank, slot, param, self._float(full, bank, slot, param, cpu))
            self.record[full] = f"dense ({why})"
            return
        assert self.policy is not None
        packed, why = random_format(
            tuple(param.shape),
            fmt,
            why,
            self.policy,
            self.dtype,
            self._bytes_filler(full, cpu),
            self.generator(f"{full}.scales", cpu),
        )
        install = getattr(bank, "install", None)
        if install is not None:
            install(slot, packed, cpu)
        else:  # banks without install(): the attributes quantize_model sets
            setattr(bank, f"{slot}_fmt", packed)
            setattr(bank, slot, nn.Parameter(torch.empty(0, device=cpu), requires_grad=False))
        self.record[full] = f"{packed.name} ({why})"

    def _bytes_filler(self, name: str, device: torch.device) -> Callable[[torch.Tensor], None]:
        """Fills a tensor with uniformly random bytes, chunk by chunk (in threads on the CPU)."""

        def fill(t: torch.Tensor) -> None:
            flat = t.view(-1).view(torch.uint8)
            n = flat.numel()
            chunks = [(i, flat[i : i + CHUNK_BYTES]) for i in range(0, n, CHUNK_BYTES)]

            def one(chunk: tuple[int, torch.Tensor]) -> None:
                i, c = chunk
                gen = self.generator(f"{name}:{i}", device)
                words = c.numel() // 8
                # int64 random_ draws [0, 2**63): every 8th byte has its top bit clear, which biases
                # 1 code in 16 (int4) a little; the full-range draw is 3-5x slower.
                if words:
                    c[: words * 8].view(torch.int64).random_(generator=gen)
                if c.numel() > words * 8:
                    c[words * 8 :].random_(0, 256, generator=gen)

            if device.type == "cpu" and len(chunks) > 1:
                list(self.pool.map(one, chunks))
            else:
                for chunk in chunks:
                    one(chunk)

        return fill


def random_format(
    shape: tuple[int, ...],
    fmt: str,
    why: str,
    policy: QuantPolicy,
    act_dtype: torch.dtype,
    fill_bytes: Callable[[torch.Tensor], None],
    gen: torch.Generator,
) -> tuple[QuantFormat, str]:
    """A packed [N, K] or stacked [E, N, K] weight of random codes whose dequantized values have
    mean about 0 and std about STD, on `gen`'s device; (format, reason). Follows `pack_with_policy`:
    an int4 or grouped int8 weight whose K is not a multiple of the group falls back to int8 per
    channel. `fill_bytes` fills the codes, `gen` draws the scales."""
    device = gen.device
    *lead, n, k = shape
    stacked = bool(lead)
    e = lead[0] if lead else 1
    group = policy.group_size if fmt == "int4" else policy.int8_group_size
    if fmt in ("int4", "int8") and group is not None and k % group:
        fmt, group, why = "int8", None, f"in={k} not a multiple of group {group}"
    if fmt == "fp8_block":
        return _random_fp8(e, n, k, stacked, device, act_dtype, fill_bytes), why
    if fmt not in ("int4", "int8"):
        raise ValueError(
            f"synthetic weights in format {fmt!r} are not supported (int4, int8, fp8_block)"
        )
    g = group or k
    bits = 4 if fmt == "int4" else 8
    codes = torch.empty(
        e, n, k * bits // 8, dtype=torch.uint8 if bits == 4 else torch.int8, device=device
    )
    fill_bytes(codes)
    levels = 1 << bits  # uniform codes over `levels` values: std = step * sqrt((levels^2 - 1) / 12)
    step = STD / math.sqrt((levels * levels - 1) / 12.0)
    scales = torch.empty(e, n, k // g, device=device).uniform_(
        0.75 * step, 1.25 * step, generator=gen
    )
    scales = scales.to(torch.float16)
    if fmt == "int8":
        return Int8Weight(
            codes, scales, None, group_size=g, stacked=stacked, act_dtype=act_dtype
        ), why
    # int4: q * scale + min (asymmetric) centred with min = -7.5 scale; symmetric is (q - 8) * scale
    mins = None if policy.symmetric else (scales.float() * -7.5).to(torch.float16)
    return Int4Weight(codes, scales, mins, group_size=g, stacked=stacked, act_dtype=act_dtype), why


def _random_fp8(
    e: int,
    n: int,
    k: int,
    stacked: bool,
    device: torch.device,
    act_dtype: torch.dtype,
    fill_bytes: Callable[[torch.Tensor], None],
) -> Fp8BlockWeight:
    """FP8 e4m3 codes N(0, FP8_CODE_STD) made from random bytes a band of rows at a time (float32
    scratch of a few MB, never the whole weight), one scale per 128 x 128 block."""
    block = 128
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=device)
    rows = max(1, (CHUNK_BYTES // 4) // max(1, k))
    bits = torch.empty(min(rows, n), k, dtype=torch.int32, device=device)
    for x in range(e):
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            b = bits[:r]
            fill_bytes(b)
            # the low 24 bits of each word (the filler leaves some top bits clear) -> uniform (0, 1)
            # -> normal by the inverse CDF; |z| < 5.4, so codes stay well inside e4m3's range
            u = b.bitwise_and_(0xFFFFFF).float().add_(0.5).mul_(1.0 / 2**24)
            z = torch.special.ndtri(u)
            codes[x, r0 : r0 + r].copy_(z.mul_(FP8_CODE_STD).clamp_(-448.0, 448.0))
    scale = torch.full((e, -(-n // block), -(-k // block)), STD / FP8_CODE_STD, device=device)
    if not stacked:
        codes, scale = codes[0], scale[0]
    return Fp8BlockWeight(codes, scale, block, act_dtype)
