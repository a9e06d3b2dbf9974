"""``dsq_label_smoothed_cross_entropy`` (:mod:`dsq_fairseq.nn.logits`): fairseq's numbers bit for
bit, without a ``[tokens, vocab]`` tensor kept for backward."""

from __future__ import annotations

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from test_model import batch, build

from dsq_fairseq.criterions.dsq_label_smoothed_cross_entropy import (
    DSQLabelSmoothedCrossEntropyCriterion,
)
from dsq_fairseq.nn.logits import SOURCE_ATTR


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def run(task, model, criterion, sample):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks
    loss, sample_size, logging = criterion(model, sample)
    loss.backward()
    return loss.detach(), logging, [p.grad.clone() for p in model.parameters()]


def saved_numels(loss: torch.Tensor):
    """Element counts of every tensor the graph of ``loss`` keeps."""
    seen, stack, out = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            out += [t.numel() for t in node.saved_tensors]
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                if isinstance(value, torch.Tensor):
                    out.append(value.numel())
    return out


@pytest.mark.parametrize("options", [
    ("--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16"),
    ("--dsq-format", "int", "--dsq-schedule", "8,4,4,8", "--dsq-int-granularity", "token"),
    ("--dsq-format", "bfp", "--dsq-schedule", "32,4,4,16"),  # Q0(x) = x: kept unpacked
])
def test_same_loss_logging_and_gradients_as_fairseqs_criterion(data_bin, options):
    task, model, _ = build(data_bin, *options, "--dropout", "0.3",
                           "--criterion", "dsq_label_smoothed_cross_entropy",
                           "--label-smoothing", "0.1", "--report-accuracy")
    model.train()
    ours = DSQLabelSmoothedCrossEntropyCriterion(task, False, 0.1, report_accuracy=True)
    theirs = LabelSmoothedCrossEntropyCriterion(task, False, 0.1, report_accuracy=True)
    sample = batch(task)
    loss_a, log_a, grads_a = run(task, model, ours, sample)
    loss_b, log_b, grads_b = run(task, model, theirs, sample)
    assert torch.equal(bits(loss_a), bits(loss_b))
    assert torch.equal(bits(log_a["nll_loss"]), bits(log_b["nll_loss"]))
    assert log_a["n_correct"] == log_b["n_correct"]
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(bits(a), bits(b))


def test_the_loss_keeps_no_vocabulary_sized_tensor(data_bin):
    task, model, _ = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16")
    model.train()
    sample = batch(task)
    vocab = len(task.target_dictionary)
    tokens = sample["target"].numel()
    ours = DSQLabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    theirs = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    loss_ours, _, _ = ours(model, sample)
    loss_theirs, _, _ = theirs(model, sample)
    assert tokens * vocab in saved_numels(loss_theirs)  # fairseq keeps the log-probabilities
    assert tokens * vocab not in saved_numels(loss_ours)
    assert loss_ours.grad_fn.name() == "_LossRecomputingLogitsBackward"


def test_fairseqs_path_where_recomputing_is_not_lossless_or_not_needed(data_bin):
    task, model, _ = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16",
                           "--dsq-rounding", "stochastic")
    model.train()
    ours = DSQLabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    sample = batch(task)
    logits = model(**sample["net_input"])[0]
    assert not hasattr(logits, SOURCE_ATTR)  # stochastic rounding: not recomputable
    loss, _, _ = ours(model, sample)
    assert loss.grad_fn.name() != "_LossRecomputingLogitsBackward"
    for extra in (("--dsq-packed-stash", "off"), ("--dsq-format", "none")):
        task, model, _ = build(data_bin, "--dsq-format", "bfp", *extra)
        model.train()
        assert not hasattr(model(**sample["net_input"])[0], SOURCE_ATTR)
    task, model, _ = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16")
    model.eval()
    with torch.no_grad():  # validation / inference: nothing is kept
        loss, _, _ = ours(model, sample)
        assert not hasattr(model(**sample["net_input"])[0], SOURCE_ATTR)


@pytest.mark.parametrize("in_place", [None, False])
@pytest.mark.parametrize("grad_loss", [1.0, 0.37, 0.0, -2.5])
def test_label_smoothed_gradient_is_autograds_bit_for_bit(grad_loss, in_place):
    """The direct gradient against autograd through fairseq's own loss code: padding rows,
    signed zeros (``grad_loss == 0``), 3-D logits, large and tiny logits."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from fairseq.utils import log_softmax

    from dsq_fairseq.criterions.dsq_label_smoothed_cross_entropy import (
        label_smoothed_logits_grad,
    )

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, 301, generator=gen) * 8
    logits[0, 0, :] = 0.0
    target = torch.randint(0, 301, (5, 7), generator=gen)
    target[1, 3:] = 1  # padding
    g = torch.tensor(grad_loss)
    x = logits.clone().requires_grad_(True)
    lprobs = log_softmax(x, dim=-1)
    loss, _ = label_smoothed_nll_loss(lprobs.view(-1, 301), target.view(-1), 0.1,
                                      ignore_index=1, reduce=True)
    (expected,) = torch.autograd.grad(loss, x, g)
    got = label_smoothed_logits_grad(logits.clone(), target, 0.1, 1, g, in_place)
    assert got.shape == logits.shape
    assert torch.equal(bits(got), bits(expected))


def test_the_criterion_takes_the_direct_gradient(data_bin, monkeypatch):
    from dsq_fairseq.criterions import dsq_label_smoothed_cross_entropy as module

    calls = []
    direct = module.label_smoothed_logits_grad
    monkeypatch.setattr(module, "label_smoothed_logits_grad",
                        lambda *a: calls.append(1) or direct(*a))
    task, model, _ = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16")
    model.train()
    loss, _, _ = DSQLabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, batch(task))
    loss.backward()
    assert calls == [1]


def test_scratch_reuses_one_buffer_and_grows_when_needed():
    from dsq_fairseq.nn.logits import Scratch

    scratch, like = Scratch(), torch.zeros(1)
    a = scratch.take((4, 6), like)
    assert a.shape == (4, 6) and a.is_contiguous() and a.dtype == torch.float32
    b = scratch.take((3, 5), like)
    assert b.data_ptr() == a.data_ptr()  # smaller: the same memory
    c = scratch.take((5, 6), like)
    assert c.shape == (5, 6)
    assert scratch.take((2, 2), like).data_ptr() == c.data_ptr()  # the grown buffer stays
    assert scratch.take((2, 2), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_repeated_steps_and_validation_match_fairseq_with_the_scratch_reused(data_bin):
    """Two training steps in a row (the second reuses the criterion's scratch buffer: the
    recompute of step 1 must not leak into step 2) and a no-grad evaluation, all bit-identical
    to fairseq's criterion."""
    task, model, _ = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16",
                           "--dropout", "0.3")
    ours = DSQLabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    theirs = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    sample = batch(task)
    model.train()
    for _ in range(2):
        loss_a, log_a, grads_a = run(task, model, ours, sample)
        loss_b, log_b, grads_b = run(task, model, theirs, sample)
        assert torch.equal(bits(loss_a), bits(loss_b))
        for a, b in zip(grads_a, grads_b):
            assert torch.equal(bits(a), bits(b))
    buffer = ours._logits_scratch._buffer
    assert buffer is not None and buffer.numel() >= sample["target"].numel()
    model.eval()
    with torch.no_grad():
        loss_a, _, log_a = ours(model, sample)
        loss_b, _, log_b = theirs(model, sample)
    assert torch.equal(bits(loss_a), bits(loss_b))
    assert torch.equal(bits(log_a["nll_loss"]), bits(log_b["nll_loss"]))
    assert ours._logits_scratch._buffer.data_ptr() == buffer.data_ptr()
