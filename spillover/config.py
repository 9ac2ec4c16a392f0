"""ModelConfig: the architecture facts every other package reads.

This is the only module that knows Hugging Face and GGUF key names; everything downstream
(layers, planner, engine) works from the typed fields below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next")

# GGUF `general.architecture` -> our model_type
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


class UnsupportedArchitectureError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"unsupported architecture {name!r}; spillover supports: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    partial_factor: float = 1.0  # fraction of head_dim that is rotated (Qwen3-Next: 0.25)
    scaling_type: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: q/k/v biases
    qk_norm: bool = False  # qwen3, qwen3_moe, qwen3_next
    hidden_act: str = "silu"
    layer_types: tuple[str, ...] = ()
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: routed-experts MLP (True) or dense MLP
    shared_expert_intermediate_size: int = 0
    # Gated DeltaNet (qwen3_next)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # zero-centred (1 + w) RMSNorm weights (qwen3_next)
    norm_offset: float = 0.0
    attn_output_gate: bool = False  # qwen3_next gated attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- derived facts -------------------------------------------------------------------
    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.linear_layers)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_factor)

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every full-attention layer for one token."""
        return 2 * len(self.attention_layers) * self.num_kv_heads * self.head_dim * dtype_bytes

    def state_bytes_per_sequence(self, state_dtype_bytes: int = 4) -> int:
        """Conv + recurrent state of every linear-attention layer for one sequence."""
        conv = self.linear_conv_dim * (self.linear_conv_kernel_dim - 1)
        rec = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        return len(self.linear_layers) * (conv + rec) * state_dtype_bytes

    def with_(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        mt = cfg.get("model_type", "")
        if mt not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(mt or str(cfg.get("architectures")))
        n_layers = int(cfg["num_hidden_layers"])
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        rope = _rope_from_hf(cfg)
        layer_types: tuple[str, ...]
        if mt == "qwen3_next":
            lt = cfg.get("layer_types")
            if lt is None:
                interval = int(cfg.get("full_attention_interval", 4))
                lt = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                      for i in range(n_layers)]
            layer_types = tuple(lt)
        else:
            layer_types = (FULL_ATTENTION,) * n_layers
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if mt in (
            "qwen3_moe", "qwen3_next") else 0
        moe_layers: tuple[bool, ...] = (False,) * n_layers
        if num_experts:
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            mlp_only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple((i not in mlp_only) and (i + 1) % step == 0 for i in range(n_layers))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        attention_bias = bool(cfg.get("attention_bias", False)) or mt == "qwen2"
        return cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            intermediate_size=int(cfg.get("intermediate_size", 0) or 0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=mt in ("qwen3", "qwen3_moe", "qwen3_next"),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            layer_types=layer_types,
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", mt == "qwen3_next")),
            moe_layers=moe_layers,
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0)
            if mt == "qwen3_next"
            else 0,
            linear_num_key_heads=int(cfg.get("linear_num_key_heads", 0) or 0),
            linear_num_value_heads=int(cfg.get("linear_num_value_heads", 0) or 0),
            linear_key_head_dim=int(cfg.get("linear_key_head_dim", 0) or 0),
            linear_value_head_dim=int(cfg.get("linear_value_head_dim", 0) or 0),
            linear_conv_kernel_dim=int(cfg.get("linear_conv_kernel_dim", 0) or 0),
            norm_offset=1.0 if mt == "qwen3_next" else 0.0,
            attn_output_gate=mt == "qwen3_next",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            extra={"architectures": cfg.get("architectures"),
                   "torch_dtype": cfg.get("torch_dtype")},
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json found (expected a Hugging "
                                    "Face model folder)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf(cfg)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values)."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedArchitectureError(f"gguf:{arch}")
        mt = GGUF_ARCHITECTURES[arch]

        def g(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_layers = int(g("block_count"))
        hidden = int(g("embedding_length"))
        n_heads = int(g("attention.head_count"))
        n_kv = int(g("attention.head_count_kv", n_heads))
        head_dim = int(g("attention.key_length", hidden // n_heads))
        vocab = g("vocab_size")
        if vocab is None:
            vocab = len(meta.get("tokenizer.ggml.tokens", []))
        num_experts = int(g("expert_count", 0) or 0)
        scaling = g("rope.scaling.type", "none")
        rope = RopeConfig(
            theta=float(g("rope.freq_base", 10000.0)),
            scaling_type=scaling if scaling in ("linear", "yarn") else "default",
            factor=float(g("rope.scaling.factor", 1.0) or 1.0),
            original_max_position=g("rope.scaling.original_context_length"),
        )
        tied = tensor_names is not None and "output.weight" not in tensor_names
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            model_type=mt,
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(g("feed_forward_length", 0) or 0),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
            rope=rope,
            max_position=int(g("context_length", 4096)),
            tie_word_embeddings=tied,
            attention_bias=mt == "qwen2",
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            layer_types=(FULL_ATTENTION,) * n_layers,
            num_experts=num_experts,
            num_experts_per_tok=int(g("expert_used_count", 0) or 0),
            moe_intermediate_size=int(g("expert_feed_forward_length", 0) or 0),
            norm_topk_prob=bool(g("expert_weights_norm", True)) if num_experts else True,
            moe_layers=(num_experts > 0,) * n_layers,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            extra={"gguf_architecture": arch},
        )


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 folds rope_theta / partial_rotary_factor / rope_scaling into rope_parameters;
    # raw config.json files on the hub still carry the legacy keys.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    src = {**scaling, **params}
    rtype = str(src.get("rope_type", src.get("type", "default")) or "default")
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(f"unsupported rope scaling type {rtype!r} (supported: default, "
                         "linear, llama3, yarn)")
    return RopeConfig(
        theta=theta,
        partial_factor=partial,
        scaling_type=rtype,
        factor=float(src.get("factor", 1.0) or 1.0),
        low_freq_factor=float(src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(src.get("high_freq_factor", 4.0)),
        original_max_position=src.get("original_max_position_embeddings"),
        beta_fast=float(src.get("beta_fast", 32.0) or 32.0),
        beta_slow=float(src.get("beta_slow", 1.0) or 1.0),
    )
