"""The q0 weight cache (:mod:`dsq_fairseq.nn.weight_cache`): reuse only while valid, and
training with it is bit-identical to training without it."""

from __future__ import annotations

import torch

from dsq_fairseq.nn import DSQRuntime, dsq_linear, weight_cache
from dsq_fairseq.precision import Precision, QuantScheme


def make_runtime(rounding="nearest", level=(4, 4, 4, 16)):
    return DSQRuntime(QuantScheme("bfp", rounding=rounding), Precision(*level), seed=3)


def test_reused_within_an_update_and_invalidated_by_any_change():
    rt = make_runtime()
    w = torch.nn.Parameter(torch.randn(8, 32))
    x = torch.randn(5, 32)
    y0 = dsq_linear(x, w, None, rt)
    assert weight_cache.stats(rt)["entries"] == 0  # no token: nothing cached
    weight_cache.begin(rt, ("train", 0))
    y1 = dsq_linear(x, w, None, rt)
    y2 = dsq_linear(x, w, None, rt)
    assert torch.equal(y0, y1) and torch.equal(y1, y2)
    assert weight_cache.stats(rt)["hits"] == 1 and weight_cache.stats(rt)["misses"] == 1

    with torch.no_grad():  # in-place update through the parameter bumps its version
        w.mul_(2)
    assert torch.equal(dsq_linear(x, w, None, rt), dsq_linear(x, w.detach().clone(), None, rt))
    hits = weight_cache.stats(rt)["hits"]

    w.data.mul_(2)  # fairseq's optimizers: no version bump -> the update token must change
    weight_cache.begin(rt, ("train", 1))
    fresh = make_runtime()
    assert torch.equal(dsq_linear(x, w, None, rt), dsq_linear(x, w, None, fresh))
    assert weight_cache.stats(rt)["hits"] == hits

    rt.precision = Precision(8, 4, 4, 16)  # another width: another entry
    assert torch.equal(dsq_linear(x, w, None, rt), dsq_linear(x, w, None, make_runtime(
        level=(8, 4, 4, 16))))
    assert weight_cache.stats(rt)["hits"] == hits


def test_a_new_token_writes_the_new_values_over_the_old_storage():
    rt = make_runtime()
    w = torch.nn.Parameter(torch.randn(8, 32))
    other = torch.nn.Parameter(torch.randn(16, 32))
    weight_cache.begin(rt, ("train", 0))
    q0 = weight_cache.quantize_weight(rt, w, 4, -1)
    q_other = weight_cache.quantize_weight(rt, other, 4, -1)
    ptr = q0.data_ptr()
    w.data.mul_(3)  # an optimizer step
    weight_cache.begin(rt, ("train", 1))
    q1 = weight_cache.quantize_weight(rt, w, 4, -1)
    assert q1.data_ptr() == ptr  # the previous update's buffer, now holding the new values
    assert torch.equal(q1, rt.scheme.quantize(w.detach(), 4, dim=-1, is_weight=True))
    assert weight_cache.quantize_weight(rt, w, 8, -1).data_ptr() != ptr  # another entry
    # a weight not quantized under the new token keeps its buffer only until the next token
    assert q_other.data_ptr() == weight_cache._cache(rt).stale[id(other)][1].data_ptr()
    weight_cache.begin(rt, ("train", 2))
    assert id(other) not in weight_cache._cache(rt).stale
    weight_cache.begin(rt, None)  # caching off: nothing kept
    assert not weight_cache._cache(rt).stale and not weight_cache._cache(rt).entries


def test_stochastic_rounding_is_not_cached():
    rt = make_runtime("stochastic")
    weight_cache.begin(rt, ("train", 0))
    w = torch.nn.Parameter(torch.randn(8, 32))
    dsq_linear(torch.randn(4, 32), w, None, rt)
    dsq_linear(torch.randn(4, 32), w, None, rt)
    assert weight_cache.stats(rt) == {"hits": 0, "misses": 0, "entries": 0}


def _train(use_cache: bool, update_freq: int = 3, updates: int = 3):
    torch.manual_seed(0)
    rt = make_runtime(level=(6, 4, 4, 16))
    lin = torch.nn.Linear(32, 16)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    data = torch.randn(updates, update_freq, 7, 32)
    losses = []
    for u in range(updates):
        weight_cache.begin(rt, ("train", u) if use_cache else None)
        for m in range(update_freq):
            loss = dsq_linear(data[u, m], lin.weight, lin.bias, rt).square().mean()
            loss.backward()
            losses.append(loss.detach())
        for p in lin.parameters():  # an update through .data, like fairseq's optimizers
            p.data.add_(p.grad, alpha=-0.05)
            p.grad = None
        opt.zero_grad()
        weight_cache.begin(rt, ("valid", u) if use_cache else None)
        with torch.no_grad():
            for m in range(2):
                losses.append(dsq_linear(data[u, m], lin.weight, lin.bias, rt).square().mean())
    return torch.stack(losses), lin.weight.detach().clone(), weight_cache.stats(rt)


def test_training_with_cache_is_bit_identical():
    cached, w_cached, stats = _train(True)
    plain, w_plain, _ = _train(False)
    assert torch.equal(cached, plain) and torch.equal(w_cached, w_plain)
    # per update: 1 miss + 2 hits in training (update_freq 3), 1 miss + 1 hit in validation
    assert stats["hits"] == 3 * 3 and stats["misses"] == 3 * 2
