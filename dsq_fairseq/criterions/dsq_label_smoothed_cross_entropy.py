"""``dsq_label_smoothed_cross_entropy``: fairseq's label-smoothed cross-entropy, same options and
same numbers, that keeps no ``[tokens, vocab]`` log-probabilities for backward.

With a DSQ model whose output projection attached a
:class:`~dsq_fairseq.nn.logits.LogitsSource` to its logits (training, round-to-nearest, stash
packing not ``off``), the loss is computed by :func:`~dsq_fairseq.nn.logits.loss_recomputing_logits`
around fairseq's own ``compute_loss``: forward values and gradients are bit-identical to
``label_smoothed_cross_entropy``; the backward recomputes the vocabulary GEMM. Any other case
(fairseq models, validation, inference, ``--dsq-packed-stash off``) is fairseq's criterion as is.
"""

from __future__ import annotations

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from dsq_fairseq.nn.logits import loss_recomputing_logits


@register_criterion(
    "dsq_label_smoothed_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig
)
class DSQLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` whose loss node keeps only the packed ``Q0(x)`` of the
    output projection (module docstring)."""

    def compute_loss(self, model, net_output, sample, reduce=True):
        parent = super()

        def loss_of(logits):
            return parent.compute_loss(model, (logits, *net_output[1:]), sample, reduce=reduce)

        out = loss_recomputing_logits(net_output[0], loss_of)
        return loss_of(net_output[0]) if out is None else out
