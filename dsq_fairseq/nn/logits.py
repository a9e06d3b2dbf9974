"""A loss over the output projection that keeps no ``[tokens, vocab]`` tensor for backward (#8).

The log-probabilities are the largest tensor a translation step retains: ``tokens x vocab x 4``
bytes (12.3 MB of 55 MB for ``transformer_iwslt_de_en``, 8k vocabulary, 384 target tokens), kept
by ``log_softmax`` and again (same storage) by the criterion's ``gather``. The logits are
``Q0(x) @ Q0(W)^T + b`` with ``x`` the decoder's ``[tokens, d]`` features, ``d << vocab``. So:

* the output projection (a :class:`~dsq_fairseq.nn.modules.DSQLinear` with
  ``dsq_keep_q0_input``) keeps its forward operand ``Q0(x)`` packed at q0 bits (``x`` itself when
  q0 is unquantized) and attaches it to the logits tensor as :class:`LogitsSource`;
* a criterion computes its loss through :func:`loss_recomputing_logits` (the plugin's
  ``dsq_label_smoothed_cross_entropy``): the loss node keeps only that source, and its backward
  recomputes the logits with the very same ``F.linear`` call (same operands, bit for bit:
  round-to-nearest is deterministic, ``Q0(W)`` comes from the weight cache or is recomputed
  identically) and differentiates the criterion's own loss code on them.

Gradients are bit-identical to the plain path; the price is one extra vocabulary GEMM (and
log-softmax) in backward. A criterion that can write its gradient directly (``grad_of``, the
plugin's criterion does) skips re-running its loss under autograd. Only when lossless:
round-to-nearest, fp32 logits, the stash packing not ``off``; otherwise the logits carry no
source and the criterion runs as usual.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dsq_fairseq.nn import weight_cache
from dsq_fairseq.nn.runtime import DSQRuntime
from dsq_fairseq.precision import Point, Precision

SOURCE_ATTR = "_dsq_logits_source"


class LogitsSource(NamedTuple):
    """How to recompute logits ``y = F.linear(Q0(x), Q0(W), b)``: the stash of ``Q0(x)``
    (``(tensors, meta)`` of :func:`~dsq_fairseq.nn.functional._stash`, 2-D ``[tokens, d]``),
    ``x``'s shape, the master weight and bias, the runtime and the q0 point the forward used."""

    stash: tuple
    x_shape: torch.Size
    weight: Tensor
    bias: Optional[Tensor]
    runtime: DSQRuntime
    q0: Point


def wants_source(runtime: DSQRuntime, x: Tensor) -> bool:
    """Whether a linear feeding a log-softmax should keep :class:`LogitsSource` (lossless only)."""
    return (runtime.packs_masks and runtime.scheme.rounding == "nearest"
            and x.dtype == torch.float32)


class Scratch:
    """One reusable buffer for a vocabulary-sized temporary that never outlives the call using
    it (the recomputed logits, the log-probs of a loss evaluated without autograd). Fresh host
    memory costs a page fault per 4 KiB page (~40 MB per ``[tokens, vocab]`` tensor here), and a
    buffer kept across steps is already mapped. Holds at most one tensor of the largest size
    asked for; not for concurrent use."""

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None

    def take(self, shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device, uninitialised."""
        numel = math.prod(shape)
        b = self._buffer
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            self._buffer = None  # release the old one before allocating the new
            self._buffer = b = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel].view(shape)


def _recompute(source: LogitsSource, stash: Tuple[Tensor, ...], weight: Tensor,
               bias: Optional[Tensor], scratch: Optional[Scratch] = None) -> Tensor:
    """The forward's ``F.linear(Q0(x), Q0(W), b)`` again; into ``scratch`` where that is the
    same kernel call as ``F.linear``'s (no bias: its ``mm`` on the flattened input; a bias and a
    2-D or 3-D input: its ``addmm``)."""
    from dsq_fairseq.nn.functional import unpack_stash

    xq = unpack_stash(stash, source.stash[1], source.runtime).view(source.x_shape)
    wq = weight_cache.quantize_weight(source.runtime, weight, source.q0, -1)
    if scratch is None or not xq.is_contiguous() or (bias is not None and xq.dim() not in (2, 3)):
        return F.linear(xq, wq, bias)
    x2 = xq.view(-1, xq.shape[-1])
    out = scratch.take((x2.shape[0], wq.shape[0]), x2)
    if bias is None:
        torch.mm(x2, wq.t(), out=out)
    else:
        torch.addmm(bias, x2, wq.t(), out=out)
    return out.view(*xq.shape[:-1], wq.shape[0])


LossOfLogits = Callable[[Tensor], Tuple[Tensor, Tensor]]
"""``logits -> (loss, nll_loss)``, built from differentiable torch ops (a criterion's own code)."""

GradOfLogits = Callable[[Tensor, Tensor], Tensor]
"""``(logits, grad_loss) -> grad_logits``: the gradient autograd would give through the
:data:`LossOfLogits` of the same criterion, bit for bit, computed directly; it may overwrite
``logits`` (the recomputed tensor, owned by the caller); it returns a new tensor."""


class _LossRecomputingLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, source: LogitsSource,  # type: ignore[override]
                loss_of: LossOfLogits, grad_of: Optional[GradOfLogits],
                scratch: Optional[Scratch], *stash: Tensor) -> Tuple[Tensor, Tensor]:
        ctx.source = source._replace(stash=((), source.stash[1]), weight=None, bias=None)
        ctx.loss_of, ctx.grad_of, ctx.scratch = loss_of, grad_of, scratch
        ctx.n_stash, ctx.has_bias = len(stash), source.bias is not None
        ctx.save_for_backward(*stash, source.weight,
                              *((source.bias,) if source.bias is not None else ()))
        loss, nll_loss = loss_of(logits)  # grad mode is off inside forward: nothing is kept
        ctx.mark_non_differentiable(nll_loss)
        return loss, nll_loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Optional[Tensor]):  # type: ignore[override]
        saved = ctx.saved_tensors
        stash, weight = saved[:ctx.n_stash], saved[ctx.n_stash]
        bias = saved[ctx.n_stash + 1] if ctx.has_bias else None
        nones = (None,) * (4 + ctx.n_stash)
        direct = ctx.grad_of is not None  # fewer [tokens, vocab] passes and temporaries
        with torch.no_grad():
            logits = _recompute(ctx.source, stash, weight, bias, ctx.scratch if direct else None)
            if direct:
                return (ctx.grad_of(logits, grad_loss), *nones)
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss, _ = ctx.loss_of(logits)
        (grad_logits,) = torch.autograd.grad(loss, logits, grad_loss)
        return (grad_logits, *nones)


def loss_recomputing_logits(logits: Tensor, loss_of: LossOfLogits,
                            grad_of: Optional[GradOfLogits] = None,
                            scratch: Optional[Scratch] = None
                            ) -> Optional[Tuple[Tensor, Tensor]]:
    """``loss_of(logits)``, keeping for backward only the logits' :class:`LogitsSource`: the
    backward recomputes the logits and differentiates ``loss_of`` on them (the same ops, so the
    same gradient bit for bit), or, given ``grad_of``, hands them to it instead, recomputed into
    ``scratch`` when given (``grad_of`` must then not return a view of its input). ``None`` when
    ``logits`` carry no source, need no gradient or are not fp32 (the caller then runs
    ``loss_of`` itself)."""
    source: Optional[LogitsSource] = getattr(logits, SOURCE_ATTR, None)
    if (source is None or logits.dtype != torch.float32 or not torch.is_grad_enabled()
            or not logits.requires_grad):
        return None
    return _LossRecomputingLogits.apply(logits, source, loss_of, grad_of, scratch,
                                        *source.stash[0])


def attach_source(y: Tensor, stash: tuple, x_shape: torch.Size, weight: Tensor,
                  bias: Optional[Tensor], runtime: DSQRuntime, precision: Precision) -> Tensor:
    """Mark ``y`` (the output projection's logits) as recomputable; returns ``y``."""
    setattr(y, SOURCE_ATTR, LogitsSource(stash, x_shape, weight, bias, runtime, precision.q0))
    return y


__all__ = ["GradOfLogits", "LogitsSource", "Scratch", "attach_source",
           "loss_recomputing_logits", "wants_source"]
