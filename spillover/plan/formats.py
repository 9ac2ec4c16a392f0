"""Weight formats as byte arithmetic: exact bytes of one [out, in] matrix, scales included.

`FormatSize` predicts what the quant/ package's formats hold (`WeightFormat.nbytes`, equal byte
for byte: tests/unit/test_plan_format_size.py); the planner only needs the sizes. Tensors that are
not quantised (embeddings, lm_head, router, norms, conv, A_log, dt_bias) stay in the model dtype,
bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

from spillover.quant import normalize_quant

BF16_BYTES = 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class FormatSize:
    name: str  # bf16 | fp8 | int8 | int4 | native
    description: str
    quality_rank: int  # lower is closer to the original weights; `auto` tries them in this order
    # int4: 0 = one group per row; fp8: 0 = one scale per row, else square blocks
    group_size: int = 128
    zero_point: bool = False  # int4 only: a zero (or min) per group next to the bf16 scale
    zero_bytes: int = BF16_BYTES  # its size: imported asymmetric checkpoints hold float32 mins

    def matrix_bytes(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        if self.name == "bf16":
            return n * BF16_BYTES
        if self.name == "fp8":
            # 1 B per weight plus one fp32 scale per block (DeepSeek/Qwen block-FP8) or per
            # row (FP8_DYNAMIC)
            b = self.group_size
            if b == 0:
                blocks = out_features
            else:
                blocks = _ceil_div(out_features, b) * _ceil_div(in_features, b)
            return n + 4 * blocks
        if self.name == "int8":
            # symmetric per-output-channel, bf16 scale per row
            return n + BF16_BYTES * out_features
        if self.name == "int4":
            per_row = 1 if self.group_size == 0 else _ceil_div(in_features, self.group_size)
            groups = out_features * per_row
            per_group = BF16_BYTES + (self.zero_bytes if self.zero_point else 0)
            return _ceil_div(n, 2) + per_group * groups
        raise ValueError(f"format {self.name!r} has no matrix size (stored bytes "
                         "come from the file)")

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a [N, K] matrix or a stack of experts [E, N, K]: each expert is
        its own matrix."""
        *lead, out_features, in_features = shape
        experts = lead[0] if lead else 1
        return experts * self.matrix_bytes(out_features, in_features)

    def bits_per_weight(self, out_features: int = 4096, in_features: int = 4096) -> float:
        return 8 * self.matrix_bytes(out_features, in_features) / (out_features * in_features)



BF16 = FormatSize("bf16", "bfloat16, as released", 0)
FP8 = FormatSize("fp8", "FP8 E4M3, fp32 scale per 128x128 block", 1)
INT8 = FormatSize("int8", "int8 per-channel, bf16 scales", 2)
INT4 = FormatSize("int4", "int4 group 128, bf16 scale", 3)
INT4_ZP = FormatSize("int4", "int4 group 128, bf16 scale + bf16 zero", 3, zero_point=True)
# Bytes exactly as stored in the file (GGUF, pre-quantised safetensors): no re-quantisation.
NATIVE = FormatSize("native", "as stored in the checkpoint", -1)

FORMATS: dict[str, FormatSize] = {"bf16": BF16, "fp8": FP8, "int8": INT8, "int4": INT4}


@dataclass(frozen=True)
class WeightScheme:
    """Which format each kind of tensor gets: dense projections and routed experts may differ."""

    dense: FormatSize
    experts: FormatSize

    @property
    def name(self) -> str:
        if self.dense == self.experts:
            return self.dense.name
        if (self.dense.name, self.experts.name) == ("int8", "int4"):
            return "int4-experts"
        return f"{self.experts.name}-experts/{self.dense.name}-dense"

    @property
    def description(self) -> str:
        if self.dense == self.experts:
            return self.dense.description
        return f"experts {self.experts.description}; dense {self.dense.description}"

    @property
    def quality_rank(self) -> int:
        return max(self.dense.quality_rank, self.experts.quality_rank)

    @classmethod
    def uniform(cls, fmt: FormatSize) -> WeightScheme:
        return cls(fmt, fmt)


def scheme_for(name: str) -> WeightScheme:
    """The scheme of a `--quant` choice (spillover.quant.QUANT_CHOICES; `auto` is
    make_plan's to pick)."""
    name = normalize_quant(name)
    if name == "native":
        return WeightScheme.uniform(NATIVE)
    if name == "int4-experts":  # 4-bit routed experts, 8-bit dense layers
        return WeightScheme(dense=INT8, experts=INT4)
    if name not in FORMATS:
        raise ValueError(f"--quant {name} names no single scheme: make_plan picks one")
    return WeightScheme.uniform(FORMATS[name])


def auto_candidates(fp8_native: bool) -> list[WeightScheme]:
    """Schemes `auto` tries, best quality first.

    Without FP8 tensor cores an fp8 checkpoint is dequantised on the fly, like int8, but with
    slightly lower accuracy, so fp8 is only offered where the GPU runs it natively.
    """
    out = [WeightScheme.uniform(BF16)]
    if fp8_native:
        out.append(WeightScheme.uniform(FP8))
    out.append(WeightScheme.uniform(INT8))
    # 4-bit experts with 8-bit dense layers keep attention precise where bytes matter least
    out.append(WeightScheme(dense=INT8, experts=INT4))
    out.append(WeightScheme.uniform(INT4))
    return out


def checkpoint_scheme(method: str, checkpoint_format: str, bits: int, group_size: int | None,
                      symmetric: bool, fp8_block: tuple[int, int] | None) -> WeightScheme | None:
    """The format a pre-quantised checkpoint loads in (spillover.quant.importers), None if it loads
    in none: GPTQ / AWQ / compressed-tensors W4A16 -> int4 (asymmetric: float32 mins), Qwen and
    compressed-tensors FP8 -> fp8 (per block or per row), compressed-tensors int8 -> int8."""
    if fp8_block is not None:
        per_row = fp8_block[1] == 0
        how = "per row" if per_row else f"per {fp8_block[0]}x{fp8_block[1]} block"
        fmt = FormatSize("fp8", f"FP8 E4M3, fp32 scale {how} (as in the checkpoint)", 1,
                         group_size=0 if per_row else fp8_block[0])
        return WeightScheme.uniform(fmt)
    if bits == 8 and (method, checkpoint_format) == ("compressed-tensors", "int-quantized"):
        fmt = FormatSize("int8", "int8 per-channel (as in the checkpoint)", 2)
        return WeightScheme.uniform(fmt)
    if bits != 4:
        return None
    g = group_size or 0
    group = f"group {g}" if g else "per channel"
    zero = "" if symmetric else " + float32 min"
    fmt = FormatSize("int4", f"int4 {group}, scale{zero} (as in the checkpoint)", 3,
                     group_size=g, zero_point=not symmetric, zero_bytes=4)
    return WeightScheme.uniform(fmt)
