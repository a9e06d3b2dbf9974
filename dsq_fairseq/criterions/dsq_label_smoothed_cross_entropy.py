"""``dsq_label_smoothed_cross_entropy``: fairseq's label-smoothed cross-entropy, same options and
same numbers, that keeps no ``[tokens, vocab]`` log-probabilities for backward.

With a DSQ model whose output projection attached a
:class:`~dsq_fairseq.nn.logits.LogitsSource` to its logits (training, round-to-nearest, stash
packing not ``off``), the loss is computed by
:func:`~dsq_fairseq.nn.logits.loss_recomputing_logits`: forward values and gradients are
bit-identical to ``label_smoothed_cross_entropy``; the backward recomputes the vocabulary GEMM.
Other models, ``--dsq-packed-stash off`` and stochastic rounding train through fairseq's code.

Where fairseq's loss is the plain formula (a DSQ model without adaptive softmax, ``reduce``, no
``--ignore-prefix-size``), two direct paths replace re-running fairseq's code, same bits:

* the backward does not differentiate fairseq's loss under autograd (four ``[tokens, vocab]``
  temporaries: log-probs, the gather's zero-filled gradient, the sum of the two branch
  gradients, the log-softmax gradient): :func:`label_smoothed_logits_grad` writes the gradient
  with the log-softmax in place over the recomputed logits and one new tensor;
* the loss without autograd (the loss node's forward; validation) writes its log-probs into a
  buffer the criterion keeps (:class:`~dsq_fairseq.nn.logits.Scratch`, also the one the
  backward recomputes the logits into) and runs fairseq's ``label_smoothed_nll_loss`` on them.

Fresh host memory costs a page fault per 4 KiB page, so each vocabulary-sized temporary counts:
``python benchmarks/criterion_speed.py`` (the backward at ``[4096, 2400]``, 2 cores): 75 ms
through fairseq's autograd, 41 ms direct.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from torch import Tensor

from dsq_fairseq.models.dsq_transformer import DSQTransformerModel
from dsq_fairseq.nn.logits import Scratch, loss_recomputing_logits


def label_smoothed_logits_grad(logits: Tensor, target: Tensor, epsilon: float,
                               padding_idx: int, grad_loss: Tensor,
                               in_place: Optional[bool] = None) -> Tensor:
    """The gradient w.r.t. fp32 ``logits [..., V]`` of fairseq's ``label_smoothed_nll_loss(
    log_softmax(logits), target, epsilon, ignore_index=padding_idx, reduce=True)[0]`` times the
    0-dim ``grad_loss``, bit-identical to autograd's (same float32 operations, same signed
    zeros). ``target``: the ``logits.numel() // V`` class indices. ``in_place`` (default: on
    CPU) overwrites ``logits`` with its log-softmax and the gradient with log-softmax's backward
    (torch's CPU kernels finish reading a row before writing it; the tests check the bits);
    else both are out of place. Returns a new tensor of ``logits``' shape.

    Autograd's gradient of the log-probs, spelled out: with ``c_n = g * (1 - eps - eps_i)``,
    ``c_s = g * eps_i`` (``eps_i = eps / (V - 1)``) it is ``0 + -c_s`` off the target,
    ``(0 + -c_n) + -c_s`` at it, ``+0`` in padding rows; then ``log_softmax``'s backward.
    """
    vocab = logits.size(-1)
    if in_place is None:
        in_place = logits.device.type == "cpu"
    lprobs = logits.view(-1, vocab)
    if in_place:  # F.log_softmax's own kernel
        torch._log_softmax(lprobs, -1, False, out=lprobs)
    else:
        lprobs = torch._log_softmax(lprobs, -1, False)
    eps_i = epsilon / (vocab - 1)
    c_n = grad_loss * (1.0 - epsilon - eps_i)  # MulBackward0 of the two loss terms
    c_s = grad_loss * eps_i
    zero = torch.zeros((), dtype=lprobs.dtype, device=lprobs.device)
    grad = torch.empty_like(lprobs)
    grad.fill_(zero + c_s.neg())  # the sum's expanded gradient added onto the gather's zeros
    target = target.reshape(-1, 1)
    grad.scatter_(-1, target, ((zero + c_n.neg()) + c_s.neg()).expand(target.shape))
    grad.masked_fill_(target.eq(padding_idx), 0.0)
    if in_place:
        torch._log_softmax_backward_data(grad, lprobs, -1, lprobs.dtype, out=grad)
    else:
        grad = torch._log_softmax_backward_data(grad, lprobs, -1, lprobs.dtype)
    return grad.view(logits.shape)


def label_smoothed_loss_no_grad(logits: Tensor, target: Tensor, epsilon: float,
                                padding_idx: int, scratch: Scratch) -> Tuple[Tensor, Tensor]:
    """fairseq's ``compute_loss`` (``reduce``, no prefix, plain log-softmax) of fp32 ``logits``
    evaluated without autograd, its log-probs written into ``scratch`` (the same
    ``_log_softmax`` kernel ``F.log_softmax`` runs, then fairseq's ``label_smoothed_nll_loss``
    itself): the same ``(loss, nll_loss)`` bits, no fresh ``[tokens, vocab]`` tensor."""
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)
    lprobs = scratch.take(tuple(flat.shape), flat)
    torch._log_softmax(flat, -1, False, out=lprobs)
    return label_smoothed_nll_loss(lprobs, target.reshape(-1), epsilon,
                                   ignore_index=padding_idx, reduce=True)


@register_criterion(
    "dsq_label_smoothed_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig
)
class DSQLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` whose loss node keeps only the packed ``Q0(x)`` of the
    output projection (module docstring)."""

    def _scratch(self) -> Scratch:
        """The criterion's one reusable ``[tokens, vocab]`` buffer (:class:`Scratch`): the
        log-probs of a loss without autograd, then the logits recomputed in backward."""
        if not hasattr(self, "_logits_scratch"):
            self._logits_scratch = Scratch()
        return self._logits_scratch

    def _plain_formula(self, model, reduce: bool) -> bool:
        """Whether this loss is fairseq's formula on ``log_softmax(logits)`` as the direct
        paths assume: a DSQ model without adaptive softmax, ``reduce``, no ignored prefix."""
        return (reduce and self.ignore_prefix_size == 0 and isinstance(model, DSQTransformerModel)
                and getattr(model.decoder, "adaptive_softmax", None) is None)

    def compute_loss(self, model, net_output, sample, reduce=True):
        parent = super()
        plain = self._plain_formula(model, reduce)
        target = model.get_targets(sample, net_output) if plain else None

        def loss_of(logits):
            if plain and not torch.is_grad_enabled() and logits.dtype == torch.float32:
                return label_smoothed_loss_no_grad(logits, target, self.eps, self.padding_idx,
                                                   self._scratch())
            return parent.compute_loss(model, (logits, *net_output[1:]), sample, reduce=reduce)

        grad_of = None
        if plain:
            def grad_of(logits, grad_loss):
                return label_smoothed_logits_grad(logits, target, self.eps, self.padding_idx,
                                                  grad_loss)

        out = loss_recomputing_logits(net_output[0], loss_of, grad_of,
                                      self._scratch() if plain else None)
        return loss_of(net_output[0]) if out is None else out
