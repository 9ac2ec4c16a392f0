"""ForwardContext: what one forward pass needs to know besides the token ids.

The runner builds it from a StepPlan, whole, before the forward; the model and its layers only
read it (it is frozen: a CUDA graph captures the tensors it holds, so nothing may be swapped in
during a forward). A batch is a flat list of T new tokens belonging to N sequences laid out one
after another (varlen, no padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionCache:
    """Paged KV cache of one full-attention layer.

    k and v: [num_blocks, block_size, n_kv_heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def block_size(self) -> int:
        return int(self.k.shape[1])


@dataclass
class LinearStateCache:
    """State slots of one Gated DeltaNet layer.

    conv: [num_slots, conv_dim, kernel-1]  (model dtype: it holds raw projected inputs)
    ssm:  [num_slots, n_v_heads, k_dim, v_dim]  float32 (recurrent state)
    """

    conv: torch.Tensor
    ssm: torch.Tensor


LinearMeta = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def build_linear_meta(
    query_lens: list[int], context_lens: list[int], state_slots: list[int], device: torch.device
) -> LinearMeta:
    """(state slots [N] int64, fresh-sequence mask [N] bool, cu_seqlens [N+1] int64) on `device`:
    the per-step tensors the linear-attention kernels need, shared by every layer."""
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    return (
        torch.tensor(state_slots, device=device, dtype=torch.long),
        torch.tensor([c == q for c, q in zip(context_lens, query_lens, strict=True)],
                     device=device),
        torch.tensor(cu, device=device, dtype=torch.long),
    )


@dataclass(frozen=True)
class ForwardContext:
    positions: torch.Tensor  # [T] int64, absolute position of every new token
    query_lens: list[int]  # [N] new tokens per sequence (sum == T)
    context_lens: list[int]  # [N] tokens in the sequence's cache after this step (>= query_lens)
    # KV addressing (full-attention layers); flat slot = block_id * block_size + offset
    slot_mapping: torch.Tensor | None = None  # [T] int64 where each new token's K/V is written
    # [N] each [context_len] int64 flat slots
    kv_indices: list[torch.Tensor] = field(default_factory=list)
    block_tables: torch.Tensor | None = None  # [N, max_blocks] int32 (-1 padded), for GPU kernels
    context_lens_tensor: torch.Tensor | None = None  # [N] int32 on the device, for GPU kernels
    # [N] linear-attention state slot per sequence
    state_slots: list[int] = field(default_factory=list)
    kv_caches: dict[int, AttentionCache] = field(default_factory=dict)  # layer index -> cache
    state_caches: dict[int, LinearStateCache] = field(default_factory=dict)  # layer index -> slots
    # Rows of the hidden state whose logits are needed (last token of each sequence by default).
    logits_indices: torch.Tensor | None = None
    # Rotary cos/sin rows [T, 1, rotary_dim] of `positions` (models with attention layers).
    rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    # `build_linear_meta(...)` of this step (hybrid models), built once by the runner.
    linear: LinearMeta | None = field(default=None, repr=False)

    def linear_meta(self, device: torch.device) -> LinearMeta:
        """The step's linear-attention tensors (`build_linear_meta`): the runner's, or, for a
        context built by hand (kernel tests), computed on each call; never stored on the context."""
        if self.linear is not None:
            return self.linear
        return build_linear_meta(self.query_lens, self.context_lens, self.state_slots, device)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def cached_lens(self) -> list[int]:
        """Tokens already in the cache before this step, per sequence."""
        return [c - q for c, q in zip(self.context_lens, self.query_lens, strict=True)]

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)
