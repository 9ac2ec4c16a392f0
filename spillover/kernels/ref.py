"""PyTorch reference implementations. Every fast kernel has one here with the same signature.

They are also the CPU path: written for clarity first, vectorised where it costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spillover.kernels.context import AttentionCache, ForwardContext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        # zero-centred weights: scale in fp32 before the cast (Qwen3-Next / Gemma order)
        return (xf * (offset + weight.float())).to(dtype)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a residual add and the norm that reads it."""
    total = x + residual
    return rms_norm(total, weight, eps, offset), total


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """rms_norm(x) · w · silu(z) over the last dim (norm before gate, w used as is; the Gated
    DeltaNet output norm). x, z [..., N], weight [N] -> x's dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    return (y * F.silu(z.float())).to(dtype)


def route_topk(logits: torch.Tensor, k: int, renormalize: bool, dtype: torch.dtype,
               shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE router: logits [T, E] -> (weights [T, k] in dtype, expert ids [T, k] int64), best
    first; softmax in fp32 over all experts, then top-k, then optionally weights summing to 1.
    shared: the last column is a shared expert's gate logit, not an expert's: it is left out of
    the softmax and comes back as a (k+1)-th column, id E-1 with weight sigmoid(logit)."""
    if shared:
        w, ids = route_topk(logits[:, :-1], k, renormalize, dtype)
        gate = torch.sigmoid(logits[:, -1:].float()).to(dtype)
        return (torch.cat([w, gate], dim=1),
                torch.cat([ids, torch.full_like(ids[:, :1], logits.shape[1] - 1)], dim=1))
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: gate_up [..., 2I] (gate columns, then up) -> SiLU(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Routed experts' outputs y [T, k, H] weighted by weights [T, k] and summed over k in fp32,
    in k order (the same bits on every run) -> [T, H] in y's dtype."""
    return (y.float() * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)


def shared_combine(routed: torch.Tensor, shared: torch.Tensor,
                   gate_logit: torch.Tensor) -> torch.Tensor:
    """routed + sigmoid(gate_logit) * shared (Qwen3-Next's shared expert), in fp32 and rounded
    once. routed, shared [T, H]; gate_logit [T, 1]."""
    total = routed.float() + torch.sigmoid(gate_logit.float()) * shared.float()
    return total.to(routed.dtype)


def gdn_split(qkvz: torch.Tensor, ba: torch.Tensor, hk: int, dk: int, r: int,
              dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's projections, grouped per key head as the checkpoint stores them
    (qkvz [T, Hk·(2dk + 2r·dv)]: q_g | k_g | v_g | z_g; ba [T, Hk·2r]: b_g | a_g), regrouped:
    (mixed [T, 2·Hk·dk + Hv·dv] = q | k | v, z [T, Hv, dv], b [T, Hv], a [T, Hv]), contiguous."""
    t = qkvz.shape[0]
    q, k, v, z = qkvz.view(t, hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
    b, a = ba.view(t, hk, 2 * r).split([r, r], dim=-1)
    mixed = torch.cat((q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)), dim=-1)
    return (mixed, z.reshape(t, hk * r, dv).contiguous(), b.reshape(t, hk * r).contiguous(),
            a.reshape(t, hk * r).contiguous())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]; rotates the first cos.shape[-1] dims of each head (NeoX
    rotate-half; cos, sin [T, 1, rotary_dim])."""
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_r, q_p = q[..., :rd], q[..., rd:]
    k_r, k_p = k[..., :rd], k[..., rd:]
    q_r = q_r * cos + rotate_half(q_r) * sin
    k_r = k_r * cos + rotate_half(k_r) * sin
    return torch.cat((q_r, q_p), dim=-1), torch.cat((k_r, k_p), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, offset: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's queries [T, Hq, D] and keys [T, Hk, D]: per-head RMSNorm (when weights are
    given; Qwen3) then the rotary embedding -> (q, k) contiguous."""
    if q_weight is not None and k_weight is not None:
        q, k = rms_norm(q, q_weight, eps, offset), rms_norm(k, k_weight, eps, offset)
    q, k = apply_rotary(q, k, cos, sin)
    return q.contiguous(), k.contiguous()


def sigmoid_mul(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(gate), x and gate [T, H, D] (gate may be a strided view) -> [T, H, D]."""
    return x * torch.sigmoid(gate)


def write_kv(cache: AttentionCache, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows [T, Hkv, D] into their paged slots."""
    hkv, d = cache.k.shape[2], cache.k.shape[3]
    cache.k.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(cache.k.dtype))
    cache.v.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(cache.v.dtype))


def _context_kv(cache: AttentionCache, ctx: ForwardContext, i: int,
                clen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [clen, Hkv, D] of sequence i's whole context, gathered from its blocks."""
    hkv, d = cache.k.shape[2], cache.k.shape[3]
    if ctx.kv_indices and ctx.kv_indices[i].numel():
        idx = ctx.kv_indices[i]
        return cache.k.view(-1, hkv, d)[idx], cache.v.view(-1, hkv, d)[idx]
    assert ctx.block_tables is not None, "paged attention needs kv_indices or block_tables"
    blocks = ctx.block_tables[i, : -(-clen // cache.block_size)].long()
    k = cache.k.index_select(0, blocks).view(-1, hkv, d)[:clen]
    return k, cache.v.index_select(0, blocks).view(-1, hkv, d)[:clen]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: AttentionCache, ctx: ForwardContext,
    scale: float
) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's whole context.

    q [T, Hq, D], k/v [T, Hkv, D] (the new tokens, already rotated) -> [T, Hq, D].
    A pure-decode batch with block tables goes through one padded `paged_attention_decode`.
    """
    assert ctx.slot_mapping is not None
    write_kv(cache, k, v, ctx.slot_mapping)
    if ctx.is_pure_decode and ctx.block_tables is not None and ctx.context_lens_tensor is not None:
        return paged_attention_decode(q, cache.k, cache.v, ctx.block_tables,
                                      ctx.context_lens_tensor, scale)
    out = torch.empty_like(q)
    start = 0
    for i, (qlen, clen) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        qi = q[start : start + qlen].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if qlen == clen:  # nothing cached before: attend over the new rows directly
            ki, vi = k[start : start + qlen], v[start : start + qlen]
        else:
            ki, vi = _context_kv(cache, ctx, i, clen)
        ki = ki.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, C, D]
        vi = vi.to(q.dtype).transpose(0, 1).unsqueeze(0)
        if qlen == 1:
            oi = F.scaled_dot_product_attention(qi, ki, vi, scale=scale, enable_gqa=True)
        elif qlen == clen:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                enable_gqa=True)
        else:
            qpos = torch.arange(clen - qlen, clen, device=q.device)
            mask = qpos[:, None] >= torch.arange(clen, device=q.device)[None, :]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                                enable_gqa=True)
        out[start : start + qlen] = oi[0].transpose(0, 1)
        start += qlen
    return out


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context (the new token's K/V already written).

    q [N, Hq, D]; k/v_cache [blocks, block_size, Hkv, D]; block_tables [N, max_blocks] int32
    (-1 padded); context_lens [N] int32 -> [N, Hq, D]. Reference of the Triton decode kernel;
    also the CPU decode path: one padded, masked SDPA for the whole batch instead of N calls.
    """
    n, d = q.shape[0], q.shape[2]
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    # Padding entries (-1) read block 0 and are masked out below; cache tensors start zeroed.
    tables = block_tables.long().clamp_min(0).view(-1)
    width = block_tables.shape[1] * bs
    # [N, Hkv, C, D]
    keys = k_cache.index_select(0, tables).view(n, width, hkv, d).transpose(1, 2).to(q.dtype)
    values = v_cache.index_select(0, tables).view(n, width, hkv, d).transpose(1, 2).to(q.dtype)
    mask = torch.arange(width, device=q.device)[None, :] < context_lens.to(q.device).long()[:, None]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )  # [N, Hq, 1, D]
    return o.squeeze(2)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, ctx: ForwardContext
) -> torch.Tensor:
    """Depthwise causal conv + SiLU per sequence, continuing from / updating each state slot.

    x [T, C], weight [C, K], conv_state [slots, C, K-1] (updated in place) -> [T, C].
    """
    kw = weight.shape[1]
    out = torch.empty_like(x)
    start = 0
    for qlen, cached, slot in zip(ctx.query_lens, ctx.cached_lens, ctx.state_slots, strict=True):
        xi = x[start : start + qlen].t()  # [C, L]
        prev = conv_state[slot] if cached > 0 else xi.new_zeros(xi.shape[0], kw - 1)
        full = torch.cat((prev.to(xi.dtype), xi), dim=-1)  # [C, K-1+L]
        # [C, L]
        y = F.conv1d(full.unsqueeze(0), weight.unsqueeze(1).to(xi.dtype), groups=xi.shape[0])[0]
        out[start : start + qlen] = F.silu(y).t()
        conv_state[slot] = full[:, -(kw - 1) :].to(conv_state.dtype)
        start += qlen
    return out


def causal_conv1d_decode(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor,
    fresh: torch.Tensor,
) -> torch.Tensor:
    """`causal_conv1d` for one new token per sequence, batched over the N sequences: reads only
    tensors (state slots [N] and fresh-sequence mask [N], `build_linear_meta`), so that a CUDA
    graph can capture it. x [N, C] -> [N, C]; conv_state rows `slots` updated in place."""
    prev = conv_state.index_select(0, slots).to(x.dtype)  # [N, C, K-1]
    prev = torch.where(fresh[:, None, None], torch.zeros_like(prev), prev)
    full = torch.cat((prev, x.unsqueeze(-1)), dim=-1)  # [N, C, K]
    y = (full.float() * weight.float()).sum(-1)
    conv_state.index_copy_(0, slots, full[:, :, 1:].to(conv_state.dtype))
    return F.silu(y).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    """Gated delta rule, token by token in fp32, per sequence from / into its state slot.

    q, k [T, Hk, dk]; v [T, Hv, dv]; g (log decay), beta [T, Hv]; ssm_state
    [slots, Hv, dk, dv] fp32. q and k are L2-normalised here and q scaled by dk^-0.5. Returns
    o [T, Hv, dv] in v's dtype.
    """
    hk, dk = q.shape[1], q.shape[2]
    hv = v.shape[1]
    rep = hv // hk
    scale = dk**-0.5
    qf = l2norm(q.float()).repeat_interleave(rep, dim=1) * scale
    kf = l2norm(k.float()).repeat_interleave(rep, dim=1)
    vf, gf, bf = v.float(), g.float(), beta.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    start = 0
    for qlen, cached, slot in zip(ctx.query_lens, ctx.cached_lens, ctx.state_slots, strict=True):
        s = ssm_state[slot].float() if cached > 0 else vf.new_zeros(hv, dk, v.shape[2])
        for t in range(start, start + qlen):
            s = s * gf[t].exp()[:, None, None]
            pred = torch.einsum("hkv,hk->hv", s, kf[t])
            delta = (vf[t] - pred) * bf[t][:, None]
            s = s + kf[t][:, :, None] * delta[:, None, :]
            out[t] = torch.einsum("hkv,hk->hv", s, qf[t])
        ssm_state[slot] = s.to(ssm_state.dtype)
        start += qlen
    return out.to(v.dtype)


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
) -> torch.Tensor:
    """`gated_delta_rule` for one new token per sequence, batched over the N sequences and
    reading only tensors (state slots [N], fresh mask [N]): capturable by a CUDA graph.
    q, k [N, Hk, dk]; v [N, Hv, dv]; g, beta [N, Hv] -> o [N, Hv, dv] in v's dtype."""
    rep = v.shape[1] // q.shape[1]
    scale = q.shape[2] ** -0.5
    qf = l2norm(q.float()).repeat_interleave(rep, dim=1) * scale  # [N, Hv, dk]
    kf = l2norm(k.float()).repeat_interleave(rep, dim=1)
    s = ssm_state.index_select(0, slots).float()  # [N, Hv, dk, dv]
    s = torch.where(fresh[:, None, None, None], torch.zeros_like(s), s)
    s = s * g.float().exp()[:, :, None, None]
    pred = torch.einsum("nhkv,nhk->nhv", s, kf)
    delta = (v.float() - pred) * beta.float()[:, :, None]
    s = s + kf[:, :, :, None] * delta[:, :, None, :]
    out = torch.einsum("nhkv,nhk->nhv", s, qf)
    ssm_state.index_copy_(0, slots, s.to(ssm_state.dtype))
    return out.to(v.dtype)


def gdn_decode(
    mixed: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
) -> torch.Tensor:
    """A Gated DeltaNet decode step after the input projections: `causal_conv1d_decode`, the
    gates, `gated_delta_rule_decode`. mixed [N, conv_dim] = q (Hk·dk) | k (Hk·dk) | v (Hv·dv)
    before the conv; a, b [N, Hv]; A_log, dt_bias [Hv]; conv_state [slots, conv_dim, K-1] and
    ssm_state [slots, Hv, dk, dv] (fp32) updated in place at rows `slots`, zeros where `fresh`.
    The head counts and dims come from ssm_state's shape. -> o [N, Hv, dv] in mixed's dtype."""
    n = mixed.shape[0]
    _, hv, dk, dv = ssm_state.shape
    key_dim = (mixed.shape[1] - hv * dv) // 2
    act = causal_conv1d_decode(mixed, conv_weight, conv_state, slots, fresh)
    q, k, v = act.split([key_dim, key_dim, hv * dv], dim=-1)
    beta = b.sigmoid()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)  # log decay, fp32, <= 0
    return gated_delta_rule_decode(q.reshape(n, -1, dk), k.reshape(n, -1, dk),
                                   v.reshape(n, hv, dv), g, beta, ssm_state, slots, fresh)
