"""Packed low-bit storage of fake-quantized tensors: what a DSQ GEMM stashes for backward.

A fake quantizer returns fp32 values that a ``w``-bit format can represent; keeping those fp32
tensors until the backward pass saves no memory. :func:`pack` re-encodes such a tensor ``q``
losslessly as ``w``-bit element codes plus its scales, and :meth:`PackedTensor.unpack` rebuilds
it **bit for bit** (the same fp32 values, including the sign of zero).

Layout (:class:`PackedTensor`):

* ``codes`` — uint8, the element codes in ``q``'s contiguous (row-major) order, sign-magnitude:
  bit ``w-1`` is the sign, bits ``0..w-2`` the magnitude ``|k| <= 2^(w-1)-1`` (so ``-0`` is kept).
  Each group of 8 consecutive elements is one little-endian ``8w``-bit integer, element ``j`` in
  bits ``[j*w, (j+1)*w)``, stored as ``w`` bytes (``w = 4``: two elements a byte, low nibble
  first; ``w = 8``: one a byte). The last group is zero-padded. Widths 9..16 store the low 8 bits
  of every code as a ``w = 8`` stream followed by the high ``w - 8`` bits as a ``(w-8)``-bit
  stream. ``ceil(n / 8) * w`` bytes for ``n`` elements.
* ``scales`` — BFP: int8 shared exponents ``E``, one per block, shape ``[pre, nblocks, 1, post]``
  where the tensor is viewed as ``[pre, n, post]`` around the blocked dim; Fixed: one int8 ``E``;
  Int: the fp32 scale(s) ``S`` exactly as :func:`~.integer.int_quantize` computed them.

Decoding: BFP/Fixed ``q = k * 2^(E-(w-2))``, one multiplication by an exact power of two
(``2^-149..2^127``, subnormal factors included), exact because ``q`` itself is representable;
Int ``q = k * S``, the very operation :func:`~.integer.int_quantize` ends with, applied to the same
``k`` (an exact float integer) and scale. Hence bit-identical. Encoding divides the other way
(``|k| = |q| * 2^((w-2)-E)``, exact; two power-of-two halves when ``2^((w-2)-E)`` overflows).
Codes are read from the decoded bytes with a 256-entry table (:func:`byte_table`).

Limits (the caller then keeps the fp32 fake-quantized tensor; :func:`pack` returns ``None``):
fp32 tensors only (in fp16 a grid value ``k * s`` may not be representable, so ``k`` could not
be recovered), widths 2..16, formats ``bfp``/``fixed``/``int`` (not ``mx``), at least one
dimension, and no non-finite value (a NaN has no code; ``bfp``/``fixed`` never produce ``inf``
at these widths).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._blocks import pad_rows
from .bfp import _exp2_halves, shared_exponent_from_bits
from .integer import int_scale

__all__ = ["PACKABLE_WIDTHS", "PackedTensor", "pack", "pack_bits", "unpack_bits"]

PACKABLE_WIDTHS = range(2, 17)
FIXED_EXPONENT_BITS = 8


def _stream(codes: Tensor, width: int) -> Tensor:
    """Bit-pack integer codes ``< 2^width`` (``width <= 8``) into uint8, 8 elements per
    ``width`` bytes (little-endian within each group)."""
    n = codes.numel()
    pad = -n % 8
    c = codes.reshape(-1)
    if pad:
        c = F.pad(c, (0, pad))
    if width == 8:
        return c.to(torch.uint8)
    if width in (1, 2, 4):
        per = 8 // width
        c = c.to(torch.uint8)
        if sys.byteorder == "little":
            # the codes of one output byte as the bytes of one integer v: code j sits at bit
            # 8j of v and goes to bit j*width, i.e. v >> (j * (8 - width)) (codes < 2^7: v >= 0)
            v = c.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[per])
            out = v | (v >> (8 - width))
            for j in range(2, per):
                out |= v >> (j * (8 - width))
            return out.to(torch.uint8)  # keeps the low byte
        c = c.view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):
            out |= c[:, j] << (j * width)
        return out
    c = c.to(torch.int64).view(-1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * width
    val = (c << shifts).sum(-1, keepdim=True)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(width, device=c.device, dtype=torch.int64) * 8
    return ((val >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unstream(data: Tensor, width: int, n: int) -> Tensor:
    """Inverse of :func:`_stream`: ``n`` codes as int32."""
    if width == 8:
        return data[:n].to(torch.int32)
    if width in (1, 2, 4):
        per = 8 // width
        shifts = torch.arange(per, device=data.device, dtype=torch.uint8) * width
        c = (data.view(-1, 1) >> shifts) & ((1 << width) - 1)
        return c.reshape(-1)[:n].to(torch.int32)
    val = data.view(-1, width).to(torch.int64)
    byte_shifts = torch.arange(width, device=data.device, dtype=torch.int64) * 8
    val = (val << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=data.device, dtype=torch.int64) * width
    c = (val >> shifts) & ((1 << width) - 1)
    return c.reshape(-1)[:n].to(torch.int32)


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """Bit-pack non-negative integer codes ``< 2^width`` (``width`` 1..16) into a uint8 stream
    of ``ceil(n / 8) * width`` bytes (layout in the module docstring)."""
    if not 1 <= width <= 16:
        raise ValueError(f"pack_bits: width must be 1..16, got {width}")
    if width <= 8:
        return _stream(codes, width)
    c = codes.reshape(-1).to(torch.int32)
    return torch.cat([_stream(c & 0xFF, 8), _stream(c >> 8, width - 8)])


def unpack_bits(data: Tensor, width: int, n: int) -> Tensor:
    """The ``n`` codes (int32) of a :func:`pack_bits` stream."""
    if width <= 8:
        return _unstream(data, width, n)
    low_bytes = -(-n // 8) * 8
    low = _unstream(data[:low_bytes], 8, n)
    high = _unstream(data[low_bytes:], width - 8, n)
    return low | (high << 8)


def _encode_signed(k: Tensor, width: int) -> Tensor:
    """Sign-magnitude codes of float integers ``|k| <= 2^(w-1)-1`` (``-0`` keeps its sign):
    ``|k| + 2^(w-1) * signbit(k)``. uint8 for ``w <= 8``, int32 above (no ``torch.where``: slow
    on CPU)."""
    neg = torch.signbit(k).view(torch.uint8)
    codes = k.abs().to(torch.uint8 if width <= 8 else torch.int32)
    return codes.add_(neg, alpha=2 ** (width - 1))


def _decode_signed(codes: Tensor, width: int) -> Tensor:
    mag = (codes & ((1 << (width - 1)) - 1)).to(torch.float32)
    return torch.where((codes >> (width - 1)).bool(), -mag, mag)


_LUTS: Dict[Tuple[int, str, str], Tensor] = {}


def byte_table(width: int, device: torch.device, kind: str) -> Tensor:
    """``[256, 8 // width]`` table (``width`` 1, 2, 4 or 8): the codes held by each byte value
    in stream order, as ``kind`` ``"bool"`` (width 1) or ``"signed"`` (their sign-magnitude
    values in fp32, ``-0`` included). Indexing it with a stream's bytes decodes the stream in one
    gather."""
    key = (width, str(device), kind)
    table = _LUTS.get(key)
    if table is None:
        b = torch.arange(256, dtype=torch.int32)
        shifts = torch.arange(8 // width, dtype=torch.int32) * width
        c = (b[:, None] >> shifts) & ((1 << width) - 1)
        table = c.bool() if kind == "bool" else _decode_signed(c, width)
        table = _LUTS[key] = table.to(device)
    return table


def _decode_values(codes: Tensor, width: int, n: int) -> Tensor:
    """The ``n`` signed code values of a :func:`pack_bits` stream, as fp32."""
    if width == 4:  # a byte's two fp32 values read as one int64: one 8-byte gather a byte
        table = byte_table(width, codes.device, "signed").view(torch.int64).view(-1)
        return table.index_select(0, codes.int()).view(torch.float32)[:n]
    if width in (2, 8):
        table = byte_table(width, codes.device, "signed")
        return table.index_select(0, codes.long()).view(-1)[:n]  # faster than table[codes]
    return _decode_signed(unpack_bits(codes, width, n), width)


def _blocked_view(t: Tensor, dim: int, block_size: int) -> Tuple[Tensor, int, int, int, int]:
    """``t`` as ``[pre, nblocks, block_size, post]`` (zero-padded along ``dim``)."""
    shape = t.shape
    n = shape[dim]
    pre = 1
    for s in shape[:dim]:
        pre *= s
    post = t.numel() // max(pre * n, 1)
    nblocks = -(-n // block_size)
    t3 = t.reshape(pre, n, post)
    pad = nblocks * block_size - n
    if pad:
        t3 = pad_rows(t3, pad)
    return t3.view(pre, nblocks, block_size, post), pre, n, post, nblocks


@dataclass
class PackedTensor:
    """A fake-quantized fp32 tensor stored as packed ``width``-bit codes plus scales.

    ``kind``: ``"pow2"`` (BFP: int8 exponents, ``block_size`` elements along ``dim`` per
    exponent), ``"fixed"`` (one int8 exponent: one block over the flattened tensor) or ``"int"``
    (fp32 scales ``S``).
    :meth:`unpack` returns exactly the tensor that was packed.
    """

    codes: Tensor
    scales: Tensor
    shape: torch.Size
    width: int
    kind: str
    dim: int = 0
    block_size: int = 1
    fast: bool = False  # made by .fast_pack.bfp_pack: unpacked by its compiled kernel too

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales."""
        return (self.codes.numel() * self.codes.element_size()
                + self.scales.numel() * self.scales.element_size())

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """The tensors to keep (e.g. via ``ctx.save_for_backward``)."""
        return self.codes, self.scales

    def meta(self) -> tuple:
        """Everything but the tensors; ``PackedTensor(*tensors, *meta)`` rebuilds it."""
        return (self.shape, self.width, self.kind, self.dim, self.block_size, self.fast)

    def unpack(self) -> Tensor:
        """The packed tensor, bit-identical, as a new contiguous fp32 tensor."""
        if self.fast:
            from .fast_pack import bfp_unpack

            out = bfp_unpack(self)
            if out is not None:
                return out
        numel = 1
        for s in self.shape:
            numel *= s
        k = _decode_values(self.codes, self.width, numel)
        if self.kind == "int":
            return k.view(self.shape).mul_(self.scales)
        scale = _pow2(self.scales.to(torch.int32) - (self.width - 2))
        if self.kind == "fixed":  # one block: the flattened tensor
            return k.mul_(scale.view(())).view(self.shape)
        # in place on the decoded tensor, whole blocks and the short tail block apart (no
        # zero-padded copy); scale: [pre, nblocks, 1, post]
        dim = self.dim % len(self.shape)
        pre = math.prod(self.shape[:dim])
        n, post, b = self.shape[dim], math.prod(self.shape[dim + 1:]), self.block_size
        k3 = k.view(pre, n, post)
        full = n // b
        if full:
            k3[:, :full * b].view(pre, full, b, post).mul_(scale[:, :full])
        if full * b != n:
            k3[:, full * b:].mul_(scale[:, full])
        return k.view(self.shape)


def _pow2(k: Tensor) -> Tensor:
    """``2**k`` (fp32, exact) for an int32 tensor ``k`` in ``[-149, 127]``: built from its bit
    pattern (normal) or as a subnormal ``2**(k + 126) * 2**-126`` (exact: a power of two). Both
    are computed on the (small, per-block) tensor and selected: no host sync."""
    normal = ((k.clamp(min=-126) + 127) << 23).view(torch.float32)
    sub = ((k.clamp(min=-149) + 126 + 127) << 23).view(torch.float32) * 2.0 ** -126
    return torch.where(k >= -126, normal, sub)


def pack(
    q: Tensor,
    format: str,
    width: int,
    dim: int = -1,
    block_size: int = 16,
    exponent_bits: int = 8,
    x: Optional[Tensor] = None,
    int_granularity: str = "tensor",
) -> Optional[PackedTensor]:
    """Pack ``q``, the output of the ``format`` quantizer at ``width``, or ``None`` if it can't be.

    Args:
        q: fake-quantized fp32 tensor (``bfp_quantize`` / ``fixed_quantize`` / ``int_quantize``
            output with these parameters).
        format: ``"bfp"``, ``"fixed"`` or ``"int"`` (anything else: ``None``).
        dim, block_size, exponent_bits: BFP blocking, as given to :func:`~.bfp.bfp_quantize`.
        x: the tensor ``q`` was quantized from; required for ``int`` (its scale is recomputed
            from ``x`` exactly as :func:`~.integer.int_quantize` does).
        int_granularity: ``tensor`` or ``channel``/``token`` (one scale per vector along ``dim``).

    Returns ``None`` (keep ``q`` unpacked) for non-fp32 tensors, widths outside 2..16, other
    formats, empty, 0-d or meta tensors and tensors holding a non-finite value.
    """
    if (
        q.dtype != torch.float32 or width not in PACKABLE_WIDTHS or q.numel() == 0
        or format not in ("bfp", "fixed", "int") or q.dim() == 0 or q.is_meta
    ):
        return None
    with torch.no_grad():
        q = q.detach()
        if format == "int":
            if not bool(torch.isfinite(q).all()):
                return None
            if x is None or x.dtype != torch.float32:
                return None
            scale = int_scale(x.detach(), width, int_granularity, dim)
            k = torch.round(q / torch.where(scale == 0, 1.0, scale))
            codes = pack_bits(_encode_signed(k, width), width)
            return PackedTensor(codes, scale, q.shape, width, "int")
        shape, kind = q.shape, "pow2"
        if format == "fixed":  # one block: the flattened tensor
            q, dim, block_size, exponent_bits, kind = (
                q.reshape(-1), 0, q.numel(), FIXED_EXPONENT_BITS, "fixed"
            )
        dim = dim % q.dim()
        qb, pre, n, post, nblocks = _blocked_view(q, dim, block_size)
        # E from the quantized block maximum equals the quantizer's E (module docstring): the
        # block maximum of q lies in [2^E, 2^(E+1)) unless E was clamped, and the clamp repeats.
        mag = qb.abs()
        amax = mag.amax(dim=2, keepdim=True)  # NaN / inf show here: no code for them
        if not math.isfinite(amax.max().item()):
            return None
        emax = 2 ** (exponent_bits - 1) - 1
        e = shared_exponent_from_bits(amax, emax)
        shift = (width - 2) - e
        lo, hi = torch.aminmax(shift)
        if -126 <= lo.item() and hi.item() <= 127:  # 2^shift is a normal fp32: one multiply
            mag.mul_(((shift + 127) << 23).view(torch.float32))
        else:
            up_a, up_b = _exp2_halves(shift, torch.float32)
            mag.mul_(up_a).mul_(up_b)
        # exact either way: |q| = |k| * 2^(E-(w-2)) with |k| <= 2^(w-1)-1; codes: |k| + sign bit
        codes = mag.to(torch.uint8 if width <= 8 else torch.int32)
        codes.add_(torch.signbit(qb).view(torch.uint8), alpha=2 ** (width - 1))
        codes = codes.view(pre, nblocks * block_size, post)
        if nblocks * block_size != n:
            codes = codes[:, :n]
        codes = pack_bits(codes.reshape(-1), width)
        return PackedTensor(codes, e.to(torch.int8), shape, width, kind, dim, block_size)
