"""Tensor inventory: every weight of a model with its shape and component, from config or headers.

From a ModelConfig the list is derived (checkpoint-style names, routed experts stacked per layer);
from a GGUF file it is read from the header with the exact stored bytes of each tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

from spillover.config import ModelConfig
from spillover.plan.formats import BF16_BYTES, WeightScheme

EMBEDDINGS = "embeddings"
LM_HEAD = "lm_head"
ATTENTION = "attention"
LINEAR_ATTENTION = "linear_attention"
ROUTER = "router"
SHARED_EXPERTS = "shared_experts"
ROUTED_EXPERTS = "routed_experts"
MLP = "mlp"
NORMS = "norms"
COMPONENTS = (
    EMBEDDINGS,
    LM_HEAD,
    ATTENTION,
    LINEAR_ATTENTION,
    ROUTER,
    SHARED_EXPERTS,
    ROUTED_EXPERTS,
    MLP,
    NORMS,
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    component: str
    shape: tuple[int, ...]  # [out, in] for matrices; [E, out, in] for stacked routed experts
    layer: int | None = None
    quantizable: bool = False  # a 2-D projection (per expert for stacked experts)
    stored_bytes: int | None = None  # exact bytes in the file, when read from a header
    stored_dtype: str | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def nbytes(self, scheme: WeightScheme) -> int:
        fmt = scheme.experts if self.component == ROUTED_EXPERTS else scheme.dense
        if fmt.name == "native":
            return self.stored_bytes if self.stored_bytes is not None else self.numel * BF16_BYTES
        if not self.quantizable:
            return self.numel * BF16_BYTES
        if len(self.shape) == 3:
            return self.shape[0] * fmt.matrix_bytes(self.shape[1], self.shape[2])
        return fmt.matrix_bytes(self.shape[0], self.shape[1])


@dataclass(frozen=True)
class Inventory:
    tensors: tuple[TensorSpec, ...]
    source: str  # "config" | "gguf" | "safetensors"

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def params_by_component(self) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for t in self.tensors:
            out[t.component] += t.numel
        return {k: v for k, v in out.items() if v}

    def bytes_by_component(self, scheme: WeightScheme) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for t in self.tensors:
            out[t.component] += t.nbytes(scheme)
        return {k: v for k, v in out.items() if v}

    def layer_bytes(self, scheme: WeightScheme, component: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.tensors:
            if t.component == component and t.layer is not None:
                out[t.layer] = out.get(t.layer, 0) + t.nbytes(scheme)
        return out

    @property
    def is_native_only(self) -> bool:
        """A GGUF keeps its own formats: bytes cannot be re-derived for another scheme."""
        return self.source == "gguf"


# ---- from a ModelConfig -------------------------------------------------------------------------
def inventory_from_config(cfg: ModelConfig) -> Inventory:
    h, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ts: list[TensorSpec] = [TensorSpec("model.embed_tokens.weight", EMBEDDINGS,
                                       (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        ts += [
            TensorSpec(p + "input_layernorm.weight", NORMS, (h,), i),
            TensorSpec(p + "post_attention_layernorm.weight", NORMS, (h,), i),
        ]
        if cfg.layer_types[i] == "linear_attention":
            ts += _gated_deltanet(cfg, p + "linear_attn.", i)
        else:
            a = p + "self_attn."
            q_out = nh * hd * (2 if cfg.attn_output_gate else 1)
            ts += [
                TensorSpec(a + "q_proj.weight", ATTENTION, (q_out, h), i, True),
                TensorSpec(a + "k_proj.weight", ATTENTION, (nkv * hd, h), i, True),
                TensorSpec(a + "v_proj.weight", ATTENTION, (nkv * hd, h), i, True),
                TensorSpec(a + "o_proj.weight", ATTENTION, (h, nh * hd), i, True),
            ]
            if cfg.attention_bias:
                ts += [
                    TensorSpec(a + "q_proj.bias", ATTENTION, (q_out,), i),
                    TensorSpec(a + "k_proj.bias", ATTENTION, (nkv * hd,), i),
                    TensorSpec(a + "v_proj.bias", ATTENTION, (nkv * hd,), i),
                ]
            if cfg.qk_norm:
                ts += [
                    TensorSpec(a + "q_norm.weight", ATTENTION, (hd,), i),
                    TensorSpec(a + "k_norm.weight", ATTENTION, (hd,), i),
                ]
        m = p + "mlp."
        if cfg.moe_layers and cfg.moe_layers[i] and cfg.num_experts:
            e, mi = cfg.num_experts, cfg.moe_intermediate_size
            ts += [
                TensorSpec(m + "gate.weight", ROUTER, (e, h), i),
                TensorSpec(m + "experts.gate_proj", ROUTED_EXPERTS, (e, mi, h), i, True),
                TensorSpec(m + "experts.up_proj", ROUTED_EXPERTS, (e, mi, h), i, True),
                TensorSpec(m + "experts.down_proj", ROUTED_EXPERTS, (e, h, mi), i, True),
            ]
            si = cfg.shared_expert_intermediate_size
            if si:
                s = m + "shared_expert."
                ts += [
                    TensorSpec(s + "gate_proj.weight", SHARED_EXPERTS, (si, h), i, True),
                    TensorSpec(s + "up_proj.weight", SHARED_EXPERTS, (si, h), i, True),
                    TensorSpec(s + "down_proj.weight", SHARED_EXPERTS, (h, si), i, True),
                    # a [1, H] gating vector: tiny and precision-sensitive, kept with the router
                    TensorSpec(m + "shared_expert_gate.weight", ROUTER, (1, h), i),
                ]
        else:
            it = cfg.intermediate_size
            ts += [
                TensorSpec(m + "gate_proj.weight", MLP, (it, h), i, True),
                TensorSpec(m + "up_proj.weight", MLP, (it, h), i, True),
                TensorSpec(m + "down_proj.weight", MLP, (h, it), i, True),
            ]
    ts.append(TensorSpec("model.norm.weight", NORMS, (h,)))
    if not cfg.tie_word_embeddings:
        ts.append(TensorSpec("lm_head.weight", LM_HEAD, (cfg.vocab_size, h)))
    return Inventory(tuple(ts), "config")


def _gated_deltanet(cfg: ModelConfig, p: str, i: int) -> list[TensorSpec]:
    h = cfg.hidden_size
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return [
        TensorSpec(p + "in_proj_qkvz.weight", LINEAR_ATTENTION,
                   (2 * nk * dk + 2 * nv * dv, h), i, True),
        TensorSpec(p + "in_proj_ba.weight", LINEAR_ATTENTION, (2 * nv, h), i, True),
        TensorSpec(p + "conv1d.weight", LINEAR_ATTENTION,
                   (cfg.linear_conv_dim, 1, cfg.linear_conv_kernel_dim), i),
        TensorSpec(p + "dt_bias", LINEAR_ATTENTION, (nv,), i),
        TensorSpec(p + "A_log", LINEAR_ATTENTION, (nv,), i),
        TensorSpec(p + "norm.weight", LINEAR_ATTENTION, (dv,), i),
        TensorSpec(p + "out_proj.weight", LINEAR_ATTENTION, (h, nv * dv), i, True),
    ]


# ---- names -> components (HF checkpoint names, GGUF names, and our module names) -----------------
_LAYER_RE = re.compile(r"(?:layers|blk|h)\.(\d+)\.")
_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(embed_tokens|token_embd|wte)\.", EMBEDDINGS),
    (r"(^|\.)(lm_head|output)\.weight$", LM_HEAD),
    (r"(shared_expert_gate|ffn_gate_inp_shexp)", ROUTER),
    (r"(shared_expert|_shexp)", SHARED_EXPERTS),
    (r"(mlp\.experts|_exps\b|\.experts\.)", ROUTED_EXPERTS),
    (r"(mlp\.gate\.weight|ffn_gate_inp|\.router\.)", ROUTER),
    (r"(linear_attn|ssm_|attn_qkv\b|attn_gate\b)", LINEAR_ATTENTION),
    (r"(norm)", NORMS),
    (r"(self_attn|attn_q|attn_k|attn_v|attn_output|attn\.)", ATTENTION),
    (r"(mlp\.|ffn_gate|ffn_up|ffn_down)", MLP),
)


def component_of(name: str) -> str:
    """Component of a tensor from its name; q/k norms belong to attention, GDN norm to
    linear attn."""
    if re.search(r"(q_norm|k_norm|attn_q_norm|attn_k_norm)", name):
        return ATTENTION
    for pattern, comp in _RULES:
        if re.search(pattern, name):
            return comp
    return NORMS if name.endswith("norm.weight") else MLP


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


# ---- from file headers ---------------------------------------------------------------------------
def inventory_from_gguf_tensors(tensors: Iterable[Any]) -> Inventory:
    """`tensors`: gguf.GGUFReader().tensors (name, shape in ggml order, n_bytes, tensor_type)."""
    out: list[TensorSpec] = []
    for t in tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # ggml lists the fastest dim first
        out.append(
            TensorSpec(
                t.name,
                component_of(t.name),
                shape,
                layer_of(t.name),
                quantizable=len(shape) >= 2 and not t.name.startswith("token_embd"),
                stored_bytes=int(t.n_bytes),
                stored_dtype=str(t.tensor_type.name),
            )
        )
    return Inventory(tuple(out), "gguf")


SAFETENSORS_DTYPE_BYTES = {  # bytes per element of each safetensors dtype name
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}


def inventory_from_safetensors_header(header: Mapping[str, Mapping[str, Any]]) -> Inventory:
    """`header`: name -> {"dtype", "shape"} as in a safetensors header (all shards merged)."""
    out: list[TensorSpec] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(int(x) for x in info["shape"])
        dtype = str(info["dtype"])
        out.append(
            TensorSpec(
                name,
                component_of(name),
                shape,
                layer_of(name),
                len(shape) >= 2,
                prod(shape) * SAFETENSORS_DTYPE_BYTES.get(dtype, 2),
                dtype,
            )
        )
    return Inventory(tuple(out), "safetensors")
