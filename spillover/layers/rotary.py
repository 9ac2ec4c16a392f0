"""Rotary position embedding (NeoX rotate-half), optionally on a prefix of the head
(partial RoPE)."""

from __future__ import annotations

import math

import torch
from torch import nn

from spillover.config import RopeConfig
from spillover.kernels.ref import apply_rotary, rotate_half

__all__ = ["RotaryEmbedding", "apply_rotary", "inv_frequencies", "rotate_half"]


def inv_frequencies(rotary_dim: int, rope: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        old_ctx = float(rope.original_max_position or 8192)
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = ((old_ctx / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.scaling_type != "default":
        raise NotImplementedError(f"rope scaling {rope.scaling_type!r} is not implemented yet")
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.rope = rope
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, max_pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < max_pos or self._cos.device != device:
            n = max(max_pos, 4096 if self._cos is None else 2 * self._cos.shape[0])
            inv_freq = inv_frequencies(self.rotary_dim, self.rope).to(device)
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [n, rotary_dim], fp32 as in HF
            self._cos, self._sin = emb.cos(), emb.sin()
        assert self._sin is not None
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, max_pos: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for the given positions, [T, 1, rotary_dim]; computed once per
        forward pass."""
        cos_t, sin_t = self._table(max_pos, positions.device)
        return cos_t[positions].to(dtype).unsqueeze(1), sin_t[positions].to(dtype).unsqueeze(1)

