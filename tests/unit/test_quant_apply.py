"""quantize_model on a tiny Linear stack with an expert bank (built here, no model package)."""

from __future__ import annotations

import torch
from torch import nn

from spillover.layers.linear import Linear
from spillover.offload.bank import ResidentExpertBank
from spillover.weights.quantize import QuantPolicy, quantize_model

H, I, E, V, TOPK = 64, 32, 4, 100, 2


class Experts(ResidentExpertBank):
    """The routed experts: a resident bank, whose formats `quantize_model` installs."""

    def __init__(self) -> None:
        super().__init__(E, H, I)
        self.w13.copy_(torch.randn(E, 2 * I, H) / H**0.5)
        self.w2.copy_(torch.randn(E, H, I) / I**0.5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(H)
        self.q_proj, self.o_proj = Linear(H, H), Linear(H, H)
        self.mlp = nn.Module()
        self.mlp.gate = Linear(H, E)
        self.mlp.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o_proj(torch.tanh(self.q_proj(self.input_norm(x))))
        probs = torch.softmax(self.mlp.gate(x), dim=-1)
        w, ids = probs.topk(TOPK, dim=-1)
        return x + self.mlp.experts(x, ids, w)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = Linear(H, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _model() -> TinyModel:
    torch.manual_seed(0)
    m = TinyModel()
    for mod in m.modules():
        if isinstance(mod, Linear):
            nn.init.normal_(mod.weight, std=mod.in_features**-0.5)
    return m


def _logit_err(policy: QuantPolicy) -> tuple[float, dict[str, str], TinyModel]:
    model = _model()
    ids = torch.arange(12) % V
    with torch.no_grad():
        ref = model(ids)
        record = quantize_model(model, policy)
        out = model(ids)
    return float((out - ref).norm() / ref.norm()), record, model


def test_default_policy_keeps_router_head_and_records() -> None:
    err, record, model = _logit_err(QuantPolicy(act_dtype=torch.float32, group_size=32))
    assert record["layers.0.mlp.gate"].startswith("dense (kept")
    assert record["lm_head"].startswith("dense (kept")
    assert record["layers.0.q_proj"] == "int4 (policy default)"
    assert record["layers.1.mlp.experts.w13"] == "int4 (policy default)"
    assert model.layers[0].mlp.gate.fmt is None and model.layers[0].q_proj.fmt is not None
    assert model.layers[0].mlp.experts.w13.numel() == 0  # float copy released
    assert err < 0.25, err


def test_int8_is_close_and_overrides_apply() -> None:
    policy = QuantPolicy(default="int8", overrides={"*experts.w2": "int4"}, group_size=32,
                         act_dtype=torch.float32)
    err, record, _ = _logit_err(policy)
    assert record["layers.0.mlp.experts.w2"] == "int4 (override '*experts.w2')"
    assert record["layers.0.mlp.experts.w13"] == "int8 (policy default)"
    assert err < 0.2, err
    err8, _, _ = _logit_err(QuantPolicy(default="int8", act_dtype=torch.float32))
    assert err8 < 0.02, err8


def test_requantizing_is_a_noop_for_formatted_linears() -> None:
    model = _model()
    quantize_model(model, QuantPolicy(act_dtype=torch.float32, group_size=32))
    record = quantize_model(model, QuantPolicy(default="int8", act_dtype=torch.float32))
    assert record["layers.0.q_proj"].startswith("int4")
