"""Dropout and ReLU that keep a 1-bit mask for backward instead of an fp32 / bool tensor.

What torch's own ops keep for backward: ``F.dropout`` on CPU keeps its fp32 ``noise`` tensor
(4 bytes an element), on CUDA a bool mask (1 byte); ``F.relu`` keeps its fp32 output. All the
backward pass needs is one bit an element. :func:`dsq_dropout` and :func:`dsq_relu` compute
the very same forward values, consume the random-number stream exactly as ``F.dropout`` does
(CPU: ``empty_like(x).bernoulli_(1 - p)``, then ``x * (noise / (1 - p))``; CUDA:
``native_dropout``), keep the mask bit-packed (:func:`~dsq_fairseq.quant.packing.pack_bits` at
width 1) and return bit-identical gradients:

* dropout: ``dx = g * (mask / (1 - p))`` (CPU, as ``MulBackward``) or
  ``native_dropout_backward(g, mask, 1 / (1 - p))`` (CUDA);
* relu: ``dx = 0`` where ``relu(x) <= 0`` (the bit kept), else ``g`` (``threshold_backward``).

The DSQ model installs them (:func:`~dsq_fairseq.nn.modules.install_dsq`) in place of its
``FairseqDropout`` modules and its layers' ``F.relu``; they fall back to the torch ops when the
runtime's stash packing is ``off``, without autograd, for in-place dropout and for ``p`` outside
``(0, 1)``. On CPUs with the native kernels (:mod:`dsq_fairseq.quant.native`) the mask bits
are written from ``noise`` / ``y`` and applied to the gradient in one pass each (same bits, same
gradients), and dropout's output of a contiguous ``x`` is ``x * (bit ? 1 / (1 - p) : 0)`` in one
pass from the bits instead of torch's ``noise / (1 - p)`` and product (``noise`` is 0 or 1, the
factor is torch's own division: the same products).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dsq_fairseq.quant import native
from dsq_fairseq.quant.packing import byte_table, pack_bits


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as a uint8 bit stream, 1 bit an element (``ceil(n / 8)`` bytes)."""
    return pack_bits(mask.reshape(-1), 1)


def unpack_mask(data: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of shape ``shape`` packed by :func:`pack_mask`."""
    n = 1
    for s in shape:
        n *= s
    bits = byte_table(1, data.device, "bool").index_select(0, data.long())
    return bits.view(-1)[:n].view(shape)


def _keep_scale(like: Tensor, p: float) -> float:
    """``1 / (1 - p)`` as torch's dropout computes it on ``like``'s dtype (``noise.div_``)."""
    return torch.ones((), dtype=like.dtype).div_(1 - p).item()


class _Dropout1Bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        if x.is_cuda:
            y, mask = torch.native_dropout(x, p, True)
            bits = pack_mask(mask)
        else:  # at::native::_dropout_impl, op for op
            noise = torch.empty_like(x).bernoulli_(1 - p)
            kernels = native.available(noise)
            bits = (native.mask_pack(noise, native.MASK_NONZERO) if kernels
                    else pack_mask(noise != 0))  # the bits of noise != 0
            if kernels and x.is_contiguous():
                # x * (noise / (1 - p)) in one pass from the bits: noise is 0 or 1, and
                # 1 / (1 - p) is torch's own division (as in backward), so the same products
                y = native.mask_apply(bits, x, native.MASK_NONZERO, _keep_scale(x, p))
            else:
                noise.div_(1 - p)
                y = x * noise
        ctx.save_for_backward(bits)
        ctx.p, ctx.shape, ctx.cuda = p, x.shape, x.is_cuda
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        if not ctx.cuda and native.available(g):  # g * (bit ? 1 / (1 - p) : 0), one pass
            return native.mask_apply(bits, g, native.MASK_NONZERO,
                                     _keep_scale(g, ctx.p)).view(ctx.shape), None
        mask = unpack_mask(bits, ctx.shape)
        if ctx.cuda:
            return torch.ops.aten.native_dropout_backward(g, mask, 1.0 / (1 - ctx.p)), None
        noise = mask.to(g.dtype).div_(1 - ctx.p)
        return g * noise, None


class _ReLU1Bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.relu(x)
        # threshold_backward zeroes these (NaN passes)
        bits = (native.mask_pack(y, native.MASK_NOT_POSITIVE) if native.available(y)
                else pack_mask(y <= 0))
        ctx.save_for_backward(bits)
        ctx.shape = y.shape
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        if native.available(g):
            return native.mask_apply(bits, g, native.MASK_NOT_POSITIVE).view(ctx.shape)
        return g.masked_fill(unpack_mask(bits, ctx.shape), 0)


def _grad_needed(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def dsq_dropout(x: Tensor, p: float, inplace: bool = False) -> Tensor:
    """``F.dropout(x, p, training=True, inplace)``, same values and RNG use, 1-bit mask kept."""
    if inplace or not 0 < p < 1 or x.numel() == 0 or not _grad_needed(x):
        return F.dropout(x, p=p, training=True, inplace=inplace)
    return _Dropout1Bit.apply(x, p)


def dsq_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.relu(x)``, same values, 1-bit mask kept for backward."""
    if inplace or not _grad_needed(x):
        return F.relu(x, inplace=inplace)
    return _ReLU1Bit.apply(x)


__all__ = ["dsq_dropout", "dsq_relu", "pack_mask", "unpack_mask"]
