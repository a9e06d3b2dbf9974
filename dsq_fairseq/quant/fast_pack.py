"""Fused BFP quantize-and-pack and unpack: the packed stash without the fp32 detour (issue 4/8).

The reference stash path quantizes (``Q1(x)``, an fp32 tensor), then :func:`.packing.pack`
re-reads it to recover the exponents and codes (eight eager passes and three host syncs), and
:meth:`.packing.PackedTensor.unpack` decodes with a table gather and a scaling pass. Here, for
BFP with round-to-nearest at widths 2, 4 and 8 (``g = 8 / w`` codes a byte):

* :func:`bfp_pack` runs two compiled kernels on ``x`` itself: a block reduction (the quantizer's
  shared exponent ``E`` and scale factors, as int8 ``E``, plus one "all finite" flag) and an
  elementwise pass computing the quantizer's integer ``k = clamp(round(x * 2^((w-2)-E)))`` --
  the same IEEE operations as :func:`.fast.bfp_quantize`, so the same ``k`` -- encoded
  sign-magnitude (``-0`` keeps its sign) and ``g`` at a time OR-ed into bytes: the
  :mod:`.packing` stream layout. One host sync (the flag: a NaN/inf has no code, the caller
  keeps the fp32 tensor).
* :func:`bfp_unpack` decodes ``k * 2^(E-(w-2))`` (one exact multiplication, as the reference
  unpack) in one compiled kernel.

Layout: exactly :func:`.packing.pack`'s (the stream in ``x``'s row-major order; with a short
tail block along the blocked dim the codes of the zero padding are cut out, a uint8 copy). The
packed dimension must split into whole bytes: ``B`` and ``n`` (blocks along the contiguous last
dim) or ``post`` (otherwise) a multiple of ``g``; other shapes return ``None`` and the caller
uses the reference path. Codes, exponents and unpacked values are bit-identical to the
reference's (``tests/test_fast_pack.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fast
from ._blocks import pad_rows
from .bfp import _exp2_halves, shared_exponent_from_bits
from .packing import PackedTensor, _pow2

__all__ = ["FAST_PACK_WIDTHS", "bfp_pack", "bfp_unpack", "supports"]

FAST_PACK_WIDTHS = (2, 4, 8)
UNPACK_MIN_NUMEL = 2 ** 20
"""Smaller tensors unpack faster through the reference's table gather (a compiled call costs
~0.1 ms of guards; measured 0.33 vs 0.24 ms at 390 x 512, 1.6 vs 2.2 ms at 4096 x 512)."""


def _pack_factors(xb: Tensor, wm2: Tensor, emax: Tensor, axis: int):
    """Per block: the quantizer's scale-up halves, ``E`` as int8, and whether every element is
    finite (a NaN or inf makes its block maximum non-finite: ``amax`` propagates NaN)."""
    amax = xb.abs().amax(dim=axis, keepdim=True)
    finite = torch.isfinite(amax).all()
    e = shared_exponent_from_bits(amax, emax)
    up_a, up_b = _exp2_halves(wm2 - e, torch.float32)
    return up_a, up_b, e.to(torch.int8), finite


def _pack_codes(xg: Tensor, up_a: Tensor, up_b: Tensor, qmax: Tensor, width: int) -> Tensor:
    """Bytes of ``xg [..., g]`` (``g`` consecutive elements of the stream in the last dim): the
    quantizer's ``k`` (``_pow2_apply``'s first steps, same order), sign-magnitude, ``g`` per byte
    little-endian."""
    k = torch.clamp(torch.round(xg * up_a * up_b), -qmax, qmax)
    mag = k.abs().to(torch.int32)
    neg = (k.view(torch.int32) < 0).to(torch.int32)  # the sign bit, -0 included
    code = mag + (neg << (width - 1))
    shifts = torch.arange(8 // width, dtype=torch.int32, device=xg.device) * width
    return (code << shifts).sum(-1).to(torch.uint8)  # disjoint bit fields: sum == or


def _unpack_codes(data: Tensor, scale: Tensor, width: int) -> Tensor:
    """``[..., g]`` fp32 values of the bytes ``data [...]``: ``±|k| * scale`` per code."""
    shifts = torch.arange(8 // width, dtype=torch.int32, device=data.device) * width
    code = (data.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    mag = (code & ((1 << (width - 1)) - 1)).to(torch.float32)
    val = torch.where((code >> (width - 1)) != 0, -mag, mag)
    return val * scale


def _specialise(kind: str, axis: int, width: int, exponent_bits: int):
    wm2, qmax, emax = fast._constants(width, exponent_bits)  # baked in (see fast._specialise)
    if kind == "factors":
        def fn(xb):
            return _pack_factors(xb, wm2, emax, axis)
    elif kind == "codes":
        def fn(xg, up_a, up_b):
            return _pack_codes(xg, up_a, up_b, qmax, width)
    else:
        def fn(data, scale):
            return _unpack_codes(data, scale, width)
    return fn


def _run(kind: str, axis: int, width: int, exponent_bits: int, device: str, *args):
    key = ("pack", kind, axis, width, exponent_bits, device)
    if key not in fast._compiled:
        fast._compiled[key] = torch.compile(
            fast._named(_specialise(kind, axis, width, exponent_bits), key), dynamic=None,
            fullgraph=True)
    return fast._call(key, *args)


def _per_code(t: Tensor, axis: int, g: int) -> Tensor:
    """A per-block tensor (``[M, 1]`` or ``[P, nblocks, 1, Q]``) shaped to broadcast over the
    ``[..., g]`` codes of the byte layout (``[M, 1, 1]`` or ``[P, nblocks, 1, Q/g, g]``)."""
    if axis == 1:
        return t.unsqueeze(-1)
    return t.view(*t.shape[:3], t.shape[3] // g, g)


def supports(x: Tensor, width: int, dim: int, block_size: int) -> bool:
    """Whether :func:`bfp_pack` can pack ``x`` (fp32, width 2/4/8, whole bytes per row)."""
    if not (fast.enabled() and x.dtype == torch.float32 and width in FAST_PACK_WIDTHS
            and x.dim() > 0 and x.numel() > 0):
        return False
    g = 8 // width
    p, n, q = fast._pnq(x, dim % x.dim())
    return (block_size % g == 0 and n % g == 0) if q == 1 else (q % g == 0)


def _layout(x: Tensor, dim: int, block_size: int, g: int):
    """``(xb, axis, dyn, p, n, q, nblocks, pad)``: ``x`` zero-padded and viewed as blocks with
    the last dim split into bytes' worth of ``g`` elements."""
    p, n, q = fast._pnq(x, dim)
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    x3 = x.view(p, n, q)
    if pad:
        x3 = pad_rows(x3, pad)
    if q == 1:
        return x3.view(p * nblocks, block_size // g, g), 1, (0,), p, n, q, nblocks, pad
    return x3.view(p, nblocks, block_size, q // g, g), 2, (0, 1, 3), p, n, q, nblocks, pad


def bfp_pack(x: Tensor, width: int, exponent_bits: int = 8, block_size: int = 16,
             dim: int = -1) -> Optional[PackedTensor]:
    """``pack(bfp_quantize(x, width, exponent_bits, block_size, dim), ...)`` without the fp32
    intermediate (module docstring); ``None`` when ``x`` holds a NaN/inf, when
    :func:`supports` says no, or when compiling failed (the caller then takes the reference)."""
    if not supports(x, width, dim, block_size):
        return None
    dim = dim % x.dim()
    g = 8 // width
    xd = x.detach().contiguous()
    xg, axis, dyn, p, n, q, nblocks, pad = _layout(xd, dim, block_size, g)
    dev = xd.device.type
    xb = xg.flatten(-2)  # [M, B] or [P, nblocks, B, Q]: the blocks, for the reduction
    factors = _run("factors", axis, width, exponent_bits, dev, fast._dynamic(xb, dyn))
    if factors is None:
        return None
    up_a, up_b, e, finite = factors
    if not bool(finite):
        return None
    up_a, up_b = _per_code(up_a, axis, g), _per_code(up_b, axis, g)
    fdims = tuple(d for d in dyn if up_a.shape[d] != 1)
    data = _run("codes", axis, width, exponent_bits, dev, fast._dynamic(xg, dyn),
                fast._dynamic(up_a, fdims), fast._dynamic(up_b, fdims))
    if data is None:
        return None
    if pad:  # cut the codes of the zero padding out (uint8: cheap), back to the stream order
        rows = (nblocks * block_size, n) if axis == 2 else (nblocks * block_size // g, n // g)
        data = data.view(p, rows[0], -1)[:, :rows[1]]
    data = data.reshape(-1)
    total = data.numel() * g
    tail = -(-total // 8) * width - data.numel()  # the stream's last group is zero-padded
    if tail:
        data = torch.cat([data, data.new_zeros(tail)])
    scales = e.view(p, nblocks, 1, q if axis == 2 else 1)
    return PackedTensor(data, scales, x.shape, width, "pow2", dim, block_size, fast=True)


def bfp_unpack(packed: PackedTensor) -> Optional[Tensor]:
    """:meth:`PackedTensor.unpack` of a ``pow2`` tensor at width 2/4/8 without a tail block,
    with whole-byte rows and at least :data:`UNPACK_MIN_NUMEL` elements, in one compiled kernel;
    ``None`` otherwise (or without a compiler): the reference unpacks it."""
    width, shape = packed.width, packed.shape
    if not (fast.enabled() and packed.kind == "pow2" and width in FAST_PACK_WIDTHS
            and shape.numel() >= UNPACK_MIN_NUMEL):
        return None
    g = 8 // width
    block_size = packed.block_size
    meta = torch.empty(shape, device="meta")  # sizes only
    if not supports(meta, width, packed.dim, block_size):
        return None
    p, n, q = fast._pnq(meta, packed.dim)
    nblocks = n // block_size
    if nblocks * block_size != n:
        return None  # a short tail block: the codes don't tile blocks; the reference unpacks
    if q == 1:
        axis, dyn = 1, (0,)
        data = packed.codes[: p * nblocks * block_size // g].view(p * nblocks, block_size // g)
        e = packed.scales.view(p * nblocks, 1)
    else:
        axis, dyn = 2, (0, 1, 3)
        data = packed.codes[: p * nblocks * block_size * q // g].view(p, nblocks, block_size,
                                                                        q // g)
        e = packed.scales.view(p, nblocks, 1, q)
    # the per-block scales eagerly (a small tensor): int->float bit casts per element in the
    # kernel did not vectorize (measured 8x slower than this)
    scale = _per_code(_pow2(e.to(torch.int32) - (width - 2)), axis, g)
    fdims = tuple(d for d in dyn if scale.shape[d] != 1)
    out = _run("unpack", axis, width, 8, packed.codes.device.type, fast._dynamic(data, dyn),
               fast._dynamic(scale, fdims))
    if out is None:
        return None
    return out.view(shape)
