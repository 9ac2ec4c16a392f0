"""Integer codes to float32 inside the Triton GEMV/GEMM: the unpacking tricks and the per-word dot.

Shared by `quant_gemv.py` (decode), `quant_gemm.py` (prefill) and `fp8_gemv.py`. Each trick turns
codes into floats with the fewest instructions: bit patterns dropped into a float32's mantissa
under a chosen exponent, so no shift to bit 0 and no int->float conversion (quarter rate on
Hopper). The "biased" variants (16-bit x) leave a known offset per code that the caller removes
once per row (`_row_bias`).
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_INT4, FMT_INT8, FMT_FP8 = 0, 1, 2  # FP8: e4m3 codes, four to an int32 word


def code_offset(bits: int, has_mins: bool) -> int:
    """What the kernel subtracts from a raw code: 8 for symmetric int4, 128 for int8 (stored signed,
    read after flipping the sign bit), 0 for asymmetric int4 (its min carries the offset)."""
    return 128 if bits == 8 else (0 if has_mins else 8)


@triton.jit
def tiled_k_offset(kw):
    """Offset of word row kw in the tiled layout (`ref_quant.tiled_word_offset`, kw part)."""
    return (kw // 32) * 512 + ((kw % 32) // 4) * 64 + (kw % 4) * 2


_MAGIC = tl.constexpr(8388608.0)  # 2^23: float32 whose low mantissa bits hold an integer code


@triton.jit
def _codes(words, i: tl.constexpr, FMT: tl.constexpr, OFFSET: tl.constexpr):
    """Code i of every int32 word as float32, times 2^(SHIFT) (see `_x_scale`), minus its offset.

    Integer codes skip the shift to bit 0 where they can: (w & (15 << 4p)) | 0x4B000000 read as a
    float is 2^23 + c * 2^(4p) exactly while the code stays below the exponent bits, so one LOP3
    and one FADD give (c - offset) * 2^(4p), and x is pre-scaled by 2^(-4p) instead (exact). Codes
    in the top bits take one shared shift per word. About 3 instructions per int4 code, not 5.
    """
    if FMT == 2:
        c = (words.to(tl.uint32, bitcast=True) >> (i * 8)) & 255
        q = c.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        BITS: tl.constexpr = 4 if FMT == 0 else 8
        LOW: tl.constexpr = 5 if FMT == 0 else 2  # codes that fit below bit 23 unshifted
        P: tl.constexpr = i - LOW if i >= LOW else i
        # int8: flip each byte's sign bit (0x80808080)
        w = words ^ -2139062144 if FMT == 1 else words
        w = w.to(tl.uint32, bitcast=True)
        if i >= LOW:
            w = w >> (LOW * BITS)
        # (w | magic) & (magic | mask) == (w & mask) | magic, with one immediate per LOP3:
        # `w | magic` is shared by every code of the word, and no mask constant has to
        # live in a register.
        q = ((w | 0x4B000000)
             & (0x4B000000 | (((1 << BITS) - 1) << (P * BITS)))).to(tl.float32, bitcast=True)
        q = q - (_MAGIC + OFFSET * (1 << (P * BITS)))
    return q


@triton.jit
def _x_scale(i: tl.constexpr, FMT: tl.constexpr):
    """The power of two that `_codes` left on code i, to take off x (1 for FP8)."""
    BITS: tl.constexpr = 4 if FMT == 0 else 8
    LOW: tl.constexpr = 5 if FMT == 0 else 2
    P: tl.constexpr = 0 if FMT == 2 else (i - LOW if i >= LOW else i)
    return 1.0 / (1 << (P * BITS))


@triton.jit
def _byte_biased(words, k: tl.constexpr, magic, USE_ASM: tl.constexpr):
    """Byte k of every word (stored sign-flipped: u = s + 128) as the float32 32768 + u, exactly.

    One PRMT per code (bytes [0, u, 0, 0x47] read as float32): with the sign flip, 5 integer
    instructions per word instead of `_codes`' 7, and no FADD per code or x scaling. The 32896 * x
    this leaves in every product is taken off per row (`_B8`). The magic comes in as a kernel
    argument, so ptxas keeps it in a register and encodes the selector as the immediate (with both
    constant it reloads a selector before every PRMT).
    """
    if USE_ASM:
        SEL: tl.constexpr = 0x7604 | (k << 4)
        return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SEL};", "=r,r,r",
                                         [words, tl.broadcast_to(magic, words.shape)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # the interpreter runs no inline asm: the same values
        return ((words >> (8 * k)) & 255).to(tl.float32) + 32768.0


_B8 = tl.constexpr(32768.0 + 128.0)  # what a biased int8 code carries beyond its signed value


@triton.jit
def _nibble_biased(words, i: tl.constexpr, magic):
    """int4 code i of every word as the float32 2^(23 - p) + c, exactly: one LOP3 per code.

    A nibble at bits p..p+3 with p in 8-19 lies inside the mantissa; OR-ing in the exponent of
    2^(23 - p) (whose mantissa step is 2^(p - 23)) makes it c exactly, with no shift, no FADD
    and no x scaling. Codes 0-1 move up and 5-7 down by one shared shift each: p = 12, 16 |
    8, 12, 16 | 8, 12, 16, so the biases are 2048, 128 | 32768, 2048, 128 | 32768, 2048, 128
    (`_row_bias` takes them off per row). The largest is int8's, and so is the error: about
    1e-4 of the output's scale. `magic` is 0x47000000 (32768.0), kept in a register.
    """
    w = words.to(tl.uint32, bitcast=True)
    if i < 2:
        w = w << 12
    elif i >= 5:
        w = w >> 12
    P: tl.constexpr = (12 + 4 * i) if i < 2 else (4 * i if i < 5 else 4 * i - 12)
    exp = magic - ((P - 8) << 23)  # 2^(23 - P): the exponent drops by P - 8 from 32768's
    return ((w & (15 << P)) | exp).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot(acc, words, x0, x1, x2, x3, x4, x5, x6, x7, magic,
              FMT: tl.constexpr, OFFSET: tl.constexpr, BIASED: tl.constexpr, USE_ASM: tl.constexpr):
    """acc + sum over the codes i of each word of code_i * x_i: [BLOCK_W, BLOCK_N] float32.

    BIASED (16-bit x): each product carries a bias per row that the caller removes (`_row_bias`).
    """
    if BIASED and FMT == 1:
        w = words ^ -2139062144  # flip each byte's sign bit (0x80808080): u = s + 128
        acc += _byte_biased(w, 0, magic, USE_ASM) * x0[:, None]
        acc += _byte_biased(w, 1, magic, USE_ASM) * x1[:, None]
        acc += _byte_biased(w, 2, magic, USE_ASM) * x2[:, None]
        acc += _byte_biased(w, 3, magic, USE_ASM) * x3[:, None]
    elif BIASED:
        acc += _nibble_biased(words, 0, magic) * x0[:, None]
        acc += _nibble_biased(words, 1, magic) * x1[:, None]
        acc += _nibble_biased(words, 2, magic) * x2[:, None]
        acc += _nibble_biased(words, 3, magic) * x3[:, None]
        acc += _nibble_biased(words, 4, magic) * x4[:, None]
        acc += _nibble_biased(words, 5, magic) * x5[:, None]
        acc += _nibble_biased(words, 6, magic) * x6[:, None]
        acc += _nibble_biased(words, 7, magic) * x7[:, None]
    else:
        acc += _codes(words, 0, FMT, OFFSET) * (x0 * _x_scale(0, FMT))[:, None]
        acc += _codes(words, 1, FMT, OFFSET) * (x1 * _x_scale(1, FMT))[:, None]
        acc += _codes(words, 2, FMT, OFFSET) * (x2 * _x_scale(2, FMT))[:, None]
        acc += _codes(words, 3, FMT, OFFSET) * (x3 * _x_scale(3, FMT))[:, None]
        if FMT == 0:
            acc += _codes(words, 4, FMT, OFFSET) * (x4 * _x_scale(4, FMT))[:, None]
            acc += _codes(words, 5, FMT, OFFSET) * (x5 * _x_scale(5, FMT))[:, None]
            acc += _codes(words, 6, FMT, OFFSET) * (x6 * _x_scale(6, FMT))[:, None]
            acc += _codes(words, 7, FMT, OFFSET) * (x7 * _x_scale(7, FMT))[:, None]
    return acc


@triton.jit
def _row_bias(x0, x1, x2, x3, x4, x5, x6, x7, xsum, FMT: tl.constexpr, OFFSET: tl.constexpr):
    """What a BIASED `_word_dot` adds per word row beyond sum((c_i - offset) * x_i): [BLOCK_W]."""
    if FMT == 1:
        return _B8 * xsum
    else:  # the biases of `_nibble_biased`, plus the offset of every code
        bias = 32768.0 * (x2 + x5) + 2048.0 * (x0 + x3 + x6) + 128.0 * (x1 + x4 + x7)
        if OFFSET != 0:  # (0 * xsum is not folded away: it could be NaN)
            bias += OFFSET * xsum
        return bias


@triton.jit
def _bf16_pair(v):
    """The two bf16 of an int32 as float32 (low, high): a bf16 is the top half of a float32."""
    return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)


# float32 32768: `_byte_biased` drops a code into its mantissa's second byte
_PRMT_MAGIC = 0x47000000


@triton.jit
def _value(words, s, m, i: tl.constexpr, FMT: tl.constexpr, OFFSET: tl.constexpr,
           HAS_MINS: tl.constexpr):
    v = _codes(words, i, FMT, OFFSET) * (s * _x_scale(i, FMT))
    if HAS_MINS:
        v += m
    return v


@triton.jit
def _pair(words, s, m, a: tl.constexpr, b: tl.constexpr, FMT: tl.constexpr, OFFSET: tl.constexpr,
          HAS_MINS: tl.constexpr):
    return tl.join(_value(words, s, m, a, FMT, OFFSET, HAS_MINS),
                   _value(words, s, m, b, FMT, OFFSET, HAS_MINS))


@triton.jit
def _unpack_k_order(words, s, m, FMT: tl.constexpr, OFFSET: tl.constexpr, HAS_MINS: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """[ROWS, BLOCK_W] words with a scale (and min) each -> float32 [ROWS, BLOCK_W * VALS]
    weights, code i of word w at column w * VALS + i: the order of K, so one dot (or one
    contiguous store) covers a step.

    tl.join stacks along a new last axis and the innermost join varies slowest, hence
    the code orders.
    """
    if FMT == 0:
        even = tl.join(_pair(words, s, m, 0, 4, FMT, OFFSET, HAS_MINS),
                       _pair(words, s, m, 2, 6, FMT, OFFSET, HAS_MINS))
        odd = tl.join(_pair(words, s, m, 1, 5, FMT, OFFSET, HAS_MINS),
                      _pair(words, s, m, 3, 7, FMT, OFFSET, HAS_MINS))
        return tl.reshape(tl.join(even, odd), [ROWS, BLOCK_W * 8])
    else:
        v = tl.join(_pair(words, s, m, 0, 2, FMT, OFFSET, HAS_MINS),
                    _pair(words, s, m, 1, 3, FMT, OFFSET, HAS_MINS))
        return tl.reshape(v, [ROWS, BLOCK_W * 4])


@triton.jit
def _load_k_order(w_ptrs, s_ptrs, m_ptrs, mask, FMT: tl.constexpr, OFFSET: tl.constexpr,
                  HAS_MINS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Words [ROWS, BLOCK_W] with their scales (and mins) at the given pointers -> float32 weights
    [ROWS, BLOCK_W * VALS] in the order of K (`_unpack_k_order`); masked words read as 0."""
    words = tl.load(w_ptrs, mask=mask, other=0)
    return _dequant_k_order(words, s_ptrs, m_ptrs, mask, FMT, OFFSET, HAS_MINS, ROWS, BLOCK_W)


@triton.jit
def _dequant_k_order(words, s_ptrs, m_ptrs, mask, FMT: tl.constexpr, OFFSET: tl.constexpr,
                     HAS_MINS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """`_load_k_order` for words already loaded."""
    s = tl.load(s_ptrs, mask=mask, other=0).to(tl.float32)
    m = s
    if HAS_MINS:
        m = tl.load(m_ptrs, mask=mask, other=0).to(tl.float32)
    return _unpack_k_order(words, s, m, FMT, OFFSET, HAS_MINS, ROWS, BLOCK_W)
