"""Fused BFP quantize-and-pack and unpack: the packed stash without the fp32 detour (issue 4/8).

The reference stash path quantizes (``Q1(x)``, an fp32 tensor), then :func:`.packing.pack`
re-reads it to recover the exponents and codes (eight eager passes and three host syncs), and
:meth:`.packing.PackedTensor.unpack` decodes with a table gather and a scaling pass. Here, for
BFP with round-to-nearest at widths 2, 4 and 8 (``g = 8 / w`` codes a byte), in compiled kernels:

* :func:`bfp_pack`: (1) a block reduction: the quantizer's shared exponent ``E`` (int8) and
  scale factors per block, plus one "all finite" flag (one host sync: a NaN/inf has no code, the
  caller keeps the fp32 tensor); (2) an elementwise pass over ``x`` itself writing one uint8
  code per element: the quantizer's integer ``k = clamp(round(x * 2^((w-2)-E)))`` -- the same
  IEEE operations as :func:`.fast.bfp_quantize`, so the same ``k`` -- sign-magnitude (``-0``
  keeps its sign); (3) for ``w < 8`` a join of each ``g`` consecutive codes, read as one
  little-endian int16/int32, into a byte. Splitting (2) and (3) keeps both passes contiguous and
  vectorized: one kernel gathering ``g`` strided elements per byte ran ~6x slower.
* :func:`bfp_unpack`: the inverse: split each byte into ``g`` codes (one int16/int32 per byte,
  viewed as uint8), then decode ``k * 2^(E-(w-2))`` (one exact multiplication, as the reference
  unpack) elementwise.

Layout: exactly :func:`.packing.pack`'s (the stream in ``x``'s row-major order, the last group of
8 codes zero-padded). Any shape: with a short tail block along the blocked dim the whole blocks
and the tail are reduced in place (:func:`.fast._tail_split`) and the elementwise passes read
the block's factor per element (:func:`.fast._per_element`), so no padded copy is made. Codes,
exponents and unpacked values are bit-identical to the reference's (``tests/test_fast_pack.py``).

On a CPU with AVX-512 or AVX2 both functions hand the work to the C kernels of :mod:`.native`
instead, which also take width 16 (the stream's low bytes, then its high bytes, as
:func:`.packing.pack_bits` lays them out): the output projection's ``Q0(x)`` kept for
recomputing the logits (:mod:`dsq_fairseq.nn.logits`) is packed at q0 bits.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import fast, native
from .bfp import _exp2_halves, shared_exponent_from_bits
from .packing import PackedTensor, _pow2

__all__ = ["FAST_PACK_WIDTHS", "bfp_pack", "bfp_unpack", "supports"]

FAST_PACK_WIDTHS = (2, 4, 8)
UNPACK_MIN_NUMEL = 2 ** 20
"""Smaller tensors unpack faster through the reference's table gather (a compiled call costs
~0.1 ms of guards; measured 0.33 vs 0.24 ms at 390 x 512, 1.6 vs 2.2 ms at 4096 x 512)."""

_JOINED = {2: torch.int32, 4: torch.int16}
"""Widths below 8: the integer type holding the ``g`` one-byte codes of one packed byte."""


def _pack_factors(amax: Tensor, wm2: Tensor, emax: Tensor):
    """Per block of maximum ``amax`` (of ``|x|``, NaN propagated): the quantizer's scale-up
    halves, ``E`` as int8, and whether every element is finite (a NaN or inf makes its block
    maximum non-finite)."""
    finite = torch.isfinite(amax).all()
    e = shared_exponent_from_bits(amax, emax)
    up_a, up_b = _exp2_halves(wm2 - e, torch.float32)
    return up_a, up_b, e.to(torch.int8), finite


def _codes(x: Tensor, up_a: Tensor, up_b: Tensor, qmax: Tensor, width: int) -> Tensor:
    """One uint8 code per element of ``x`` (factors broadcast per block): the quantizer's ``k``
    (``_pow2_apply``'s first steps, same order) sign-magnitude. ``1 / k < 0`` is
    ``signbit(k)`` for finite ``k``, ``-0`` included (``1 / -0 = -inf``); ``signbit`` and bit
    casts did not vectorize (measured ~50x slower)."""
    k = torch.clamp(torch.round(x * up_a * up_b), -qmax, qmax)
    neg = (torch.reciprocal(k) < 0).to(torch.int32)
    return (k.abs().to(torch.int32) + (neg << (width - 1))).to(torch.uint8)


def _join(v: Tensor, width: int) -> Tensor:
    """Bytes of the codes' stream: ``v`` holds the ``g`` one-byte codes of each output byte as
    one little-endian integer (code ``j`` at bit ``8j``, moved to bit ``j * w``)."""
    v = v.to(torch.int32)
    mask = (1 << width) - 1
    out = v & mask
    for j in range(1, 8 // width):
        out = out | ((v >> (j * (8 - width))) & (mask << (j * width)))
    return out.to(torch.uint8)


def _split(data: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_join`: per byte, its ``g`` codes as the bytes of one integer."""
    b = data.to(torch.int32)
    mask = (1 << width) - 1
    out = b & mask
    for j in range(1, 8 // width):
        out = out | ((b << (j * (8 - width))) & (mask << (8 * j)))
    return out.to(_JOINED[width])


def _decode(codes: Tensor, scale: Tensor, width: int) -> Tensor:
    """fp32 ``±|k| * scale`` of one-byte sign-magnitude codes (``scale`` broadcast per block)."""
    c = codes.to(torch.int32)
    mag = (c & ((1 << (width - 1)) - 1)).to(torch.float32)
    return torch.where((c >> (width - 1)) != 0, -mag, mag) * scale


def _specialise(kind: str, axis: int, width: int, exponent_bits: int, block: int):
    """The function compiled for ``kind``; ``axis``: 1 (``[M, B]`` blocks), 2
    (``[P, nblocks, B, Q]``) or 0 (unpadded ``[P, n(, Q)]`` with a short tail block of
    ``block``)."""
    wm2, qmax, emax = fast._constants(width, exponent_bits)  # baked in (see fast._specialise)
    if kind == "factors":
        if axis == 0:
            def fn(full, tail):
                return _pack_factors(fast._split_amax(full, tail, torch.abs), wm2, emax)
        else:
            def fn(xb):
                return _pack_factors(xb.abs().amax(dim=axis, keepdim=True), wm2, emax)
    elif kind == "codes":
        if axis == 0:
            def fn(x, up_a, up_b):
                return _codes(x, fast._per_element(up_a, x, block),
                              fast._per_element(up_b, x, block), qmax, width)
        else:
            def fn(x, up_a, up_b):
                return _codes(x, up_a, up_b, qmax, width)
    elif kind == "join":
        def fn(v):
            return _join(v, width)
    elif kind == "split":
        def fn(data):
            return _split(data, width)
    else:  # decode
        if axis == 0:
            def fn(codes, scale):
                return _decode(codes, fast._per_element(scale, codes, block), width)
        else:
            def fn(codes, scale):
                return _decode(codes, scale, width)
    return fn


def _run(kind: str, axis: int, width: int, exponent_bits: int, block: int, device: str, *args):
    if kind in ("join", "split"):  # flat byte streams: one graph serves every layout
        axis, exponent_bits, block = -1, 8, 0
    key = ("pack", kind, axis, width, exponent_bits, block if axis == 0 else 0, device)
    if key not in fast._compiled:
        fast._compiled[key] = fast.compile_fn(
            fast._named(_specialise(kind, axis, width, exponent_bits, block), key))
    return fast._call(key, *args)


def supports(x: Tensor, width: int, dim: int, block_size: int) -> bool:
    """Whether :func:`bfp_pack` can pack ``x`` (fp32, width 2/4/8, not empty or 0-d, a
    little-endian machine: the join reads codes as little-endian integers)."""
    return (fast.enabled() and x.dtype == torch.float32 and width in FAST_PACK_WIDTHS
            and x.dim() > 0 and x.numel() > 0 and sys.byteorder == "little")


def _layout(p: int, n: int, q: int, block_size: int) -> Tuple[Tuple[int, ...], int,
                                                               Tuple[int, ...]]:
    """``(view, axis, dynamic dims)`` for the elementwise passes over ``[P, n, Q]`` blocked
    along ``n``: ``[M, B]`` (axis 1), ``[P, nblocks, B, Q]`` (axis 2), or with a short tail
    block the unpadded ``[P, n]`` / ``[P, n, Q]`` (axis 0)."""
    nblocks = n // block_size
    if nblocks * block_size != n:
        return ((p, n) if q == 1 else (p, n, q)), 0, ((0, 1) if q == 1 else (0, 1, 2))
    if q == 1:
        return (p * nblocks, block_size), 1, (0,)
    return (p, nblocks, block_size, q), 2, (0, 1, 3)


def _per_block(t: Tensor, p: int, n: int, q: int, block_size: int, axis: int) -> Tensor:
    """A per-block tensor laid out ``[P, nblocks, 1, Q]`` viewed for ``axis``'s layout."""
    nblocks = -(-n // block_size)
    if axis == 1:
        return t.reshape(p * nblocks, 1)
    if axis == 2 or q > 1:
        return t.reshape(p, nblocks, 1, q)
    return t.reshape(p, nblocks, 1)


def bfp_pack(x: Tensor, width: int, exponent_bits: int = 8, block_size: int = 16,
             dim: int = -1) -> Optional[PackedTensor]:
    """``pack(bfp_quantize(x, width, exponent_bits, block_size, dim), ...)`` without the fp32
    intermediate (module docstring); ``None`` when ``x`` holds a NaN/inf, when neither the
    native kernels (:func:`.native.supports_pack`: widths 2, 4, 8 and 16) nor the compiled ones
    (:func:`supports`) take it, or when compiling failed (the caller then takes the reference)."""
    if native.available(x) and native.supports_pack(x.shape, width):
        dim = dim % x.dim()
        out = native.bfp_pack(x, width, exponent_bits, block_size, dim)
        return None if out is None else PackedTensor(*out, x.shape, width, "pow2", dim,
                                                     block_size, fast=True)
    if not supports(x, width, dim, block_size):
        return None
    dim = dim % x.dim()
    xd = x.detach().contiguous()
    p, n, q = fast._pnq(x.shape, dim)
    view, axis, dyn = _layout(p, n, q, block_size)
    xv = xd.view(view)
    dev = xd.device.type
    run = lambda kind, *args: _run(kind, axis, width, exponent_bits, block_size, dev, *args)  # noqa: E731
    if axis == 0:
        full, tail = fast._tail_split(xv, block_size)
        factors = run("factors", fast._dynamic_full(full), fast._dynamic(tail, dyn))
    else:
        factors = run("factors", fast._dynamic(xv, dyn))
    if factors is None:
        return None
    up_a, up_b, e, finite = factors
    if not bool(finite):
        return None
    if axis == 0:  # factors come out [P, nblocks, 1(, Q)]
        up_a, up_b = (_per_block(f, p, n, q, block_size, axis) for f in (up_a, up_b))
    fdyn = dyn if axis else (0, 1, 3)
    codes = run("codes", fast._dynamic(xv, dyn), fast._dynamic_factor(up_a, fdyn),
                fast._dynamic_factor(up_b, fdyn))
    if codes is None:
        return None
    codes = codes.view(-1)
    pad = -codes.numel() % 8  # the stream's last group of 8 codes is zero-padded
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    if width < 8:
        codes = run("join", fast._dynamic(codes.view(_JOINED[width]), (0,)))
        if codes is None:
            return None
    scales = e.view(p, -(-n // block_size), 1, q)
    return PackedTensor(codes, scales, x.shape, width, "pow2", dim, block_size, fast=True)


def bfp_unpack(packed: PackedTensor) -> Optional[Tensor]:
    """:meth:`PackedTensor.unpack` of a ``pow2`` tensor at width 2/4/8 with at least
    :data:`UNPACK_MIN_NUMEL` elements, in compiled kernels; ``None`` otherwise (or without a
    compiler): the reference unpacks it."""
    width, shape = packed.width, packed.shape
    numel = shape.numel()
    if (packed.kind == "pow2" and native.available_for(packed.codes)
            and native.supports_pack(shape, width)):
        return native.bfp_unpack(packed.codes, packed.scales, shape, width, packed.block_size,
                                 packed.dim % len(shape))
    if not (fast.enabled() and packed.kind == "pow2" and width in FAST_PACK_WIDTHS
            and numel >= UNPACK_MIN_NUMEL and sys.byteorder == "little"):
        return None
    dim, block_size = packed.dim % len(shape), packed.block_size
    dev = packed.codes.device.type
    p, n, q = fast._pnq(shape, dim)
    view, axis, dyn = _layout(p, n, q, block_size)
    if axis == 1:  # rows [P, n] with a per-element scale view: a 16-byte row per vector
        # iteration (the [M, B] layout) decoded ~3.5x slower
        view, axis, dyn = (p, n), 0, (0, 1)
    run = lambda kind, *args: _run(kind, axis, width, 8, block_size, dev, *args)  # noqa: E731
    codes = packed.codes
    if width < 8:
        codes = run("split", fast._dynamic(codes, (0,)))
        if codes is None:
            return None
        codes = codes.view(torch.uint8)
    codes = codes[:numel].view(view)
    # the per-block scales eagerly (a small tensor): int->float bit casts per element in the
    # kernel did not vectorize (measured 8x slower than this)
    scale = _per_block(_pow2(packed.scales.to(torch.int32) - (width - 2)), p, n, q, block_size,
                       axis)
    out = run("decode", fast._dynamic(codes, dyn),
              fast._dynamic_factor(scale, dyn if axis else (0, 1, 3)))
    if out is None:
        return None
    return out.view(shape)
