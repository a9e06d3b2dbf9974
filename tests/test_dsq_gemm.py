"""DSQ GEMMs against hand-built formulas for every quantization point (DESIGN.md §2).

The expected values are composed from the format functions (whose values are tested against
their definitions in ``test_quant_*``) in the order DESIGN.md §2 writes them down; nothing here
calls the code under test to build an expectation.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsq_fairseq.nn import DSQRuntime, dsq_linear, dsq_matmul
from dsq_fairseq.nn.functional import _DSQLinearFunction, _DSQMatmulFunction
from dsq_fairseq.precision import Precision, QuantScheme
from dsq_fairseq.quant import bfp_quantize

BLOCK = 4


def bfp(x, w, dim):
    return x if w >= 32 else bfp_quantize(x, w, block_size=BLOCK, dim=dim)


def runtime(q0, q1, q2, q3, fmt="bfp", rounding="nearest", seed=1):
    return DSQRuntime(
        QuantScheme(format=fmt, block_size=BLOCK, rounding=rounding), Precision(q0, q1, q2, q3),
        seed=seed,
    )


def linear_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 12, generator=gen, requires_grad=True)  # [T, B, K]
    w = torch.randn(7, 12, generator=gen, requires_grad=True)  # [N, K]
    b = torch.randn(7, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, 7, generator=gen)
    return x, w, b, g


def grads(fn, *inputs, g):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(g)
    return out.detach(), [t.grad.clone() for t in inputs]


LEVELS = [(32, 32, 32, 32), (4, 32, 32, 32), (32, 3, 32, 32), (32, 32, 5, 32),
          (32, 32, 32, 3), (6, 3, 5, 4), (2, 2, 2, 16)]


@pytest.mark.parametrize("level", LEVELS)
def test_linear_matches_hand_built_formulas(level):
    q0, q1, q2, q3 = level
    x, w, b, g = linear_inputs()
    y, (gx, gw, gb) = grads(
        lambda: _DSQLinearFunction.apply(x, w, b, runtime(*level)), x, w, b, g=g
    )
    xd, wd = x.detach(), w.detach()
    x2, g2 = xd.reshape(-1, 12), g.reshape(-1, 7)
    y_ref = bfp(xd, q0, -1) @ bfp(wd, q0, -1).t() + b.detach()
    x_stash, w_stash = bfp(x2, q1, 0), bfp(wd, q1, 0)
    gx_ref = bfp(bfp(g2, q2, -1) @ bfp(w_stash, q2, 0), q3, -1).view(3, 5, 12)
    gw_ref = bfp(g2, q3, 0).t() @ x_stash
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(gb, g2.sum(0))  # bias gradient stays full precision


def test_each_point_changes_only_its_own_results():
    x, w, b, g = linear_inputs(1)
    y32, (gx32, gw32, _) = grads(lambda: F.linear(x, w, b), x, w, b, g=g)
    # q1 only: forward untouched, both gradients see the stash
    y, (gx, gw, _) = grads(lambda: _DSQLinearFunction.apply(x, w, b, runtime(32, 3, 32, 32)),
                           x, w, b, g=g)
    assert torch.allclose(y, y32, atol=1e-6)
    assert not torch.allclose(gx, gx32, atol=1e-3) and not torch.allclose(gw, gw32, atol=1e-3)
    # q2 only: forward and weight gradient untouched, input gradient changes
    y, (gx, gw, _) = grads(lambda: _DSQLinearFunction.apply(x, w, b, runtime(32, 32, 3, 32)),
                           x, w, b, g=g)
    assert torch.allclose(y, y32, atol=1e-6) and torch.allclose(gw, gw32, atol=1e-5)
    assert not torch.allclose(gx, gx32, atol=1e-3)


def test_full_precision_equals_nn_linear_exactly():
    x, w, b, g = linear_inputs(2)
    layer = nn.Linear(12, 7)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref)
    y_ref.backward(g)
    for fn in (
        lambda: _DSQLinearFunction.apply(x, w, b, runtime(32, 32, 32, 32)),
        lambda: dsq_linear(x, w, b, runtime(32, 32, 32, 32)),
    ):
        y, (gx, gw, gb) = grads(fn, x, w, b, g=g)
        assert torch.equal(y, y_ref.detach())
        assert torch.equal(gx, x_ref.grad)
        assert torch.equal(gw, layer.weight.grad)
        assert torch.equal(gb, layer.bias.grad)


def test_master_weights_stay_full_precision():
    x, w, b, g = linear_inputs(3)
    before = w.detach().clone()
    _, (_, gw, _) = grads(lambda: dsq_linear(x, w, b, runtime(2, 2, 2, 2)), x, w, b, g=g)
    assert torch.equal(w.detach(), before)
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_inference_runs_q0_only():
    x, w, b, _ = linear_inputs(4)
    rt = runtime(4, 2, 2, 2)
    with torch.no_grad():
        y = dsq_linear(x, w, b, rt)
    ref = bfp(x.detach(), 4, -1) @ bfp(w.detach(), 4, -1).t() + b.detach()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def matmul_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 5, 8, generator=gen, requires_grad=True)  # [batch, m, k]
    b = torch.randn(6, 8, 9, generator=gen, requires_grad=True)  # [batch, k, n]
    g = torch.randn(6, 5, 9, generator=gen)
    return a, b, g


@pytest.mark.parametrize("level", LEVELS)
def test_matmul_matches_hand_built_formulas(level):
    q0, q1, q2, q3 = level
    a, b, g = matmul_inputs()
    c, (ga, gb) = grads(lambda: _DSQMatmulFunction.apply(a, b, runtime(*level)), a, b, g=g)
    ad, bd = a.detach(), b.detach()
    c_ref = bfp(ad, q0, -1) @ bfp(bd, q0, -2)
    a_stash, b_stash = bfp(ad, q1, -2), bfp(bd, q1, -1)
    ga_ref = bfp(bfp(g, q2, -1) @ bfp(b_stash, q2, -1).transpose(-1, -2), q3, -1)
    gb_ref = bfp(bfp(a_stash, q2, -2).transpose(-1, -2) @ bfp(g, q2, -2), q3, -2)
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, ga_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-6, atol=1e-6)


def test_matmul_full_precision_equals_torch():
    a, b, g = matmul_inputs(1)
    c_ref, (ga_ref, gb_ref) = grads(lambda: torch.bmm(a, b), a, b, g=g)
    c, (ga, gb) = grads(lambda: dsq_matmul(a, b, runtime(32, 32, 32, 32)), a, b, g=g)
    assert torch.equal(c, c_ref) and torch.equal(ga, ga_ref) and torch.equal(gb, gb_ref)


def test_format_none_is_plain_torch_at_any_width():
    x, w, b, g = linear_inputs(5)
    y_ref, grads_ref = grads(lambda: F.linear(x, w, b), x, w, b, g=g)
    y, grads_none = grads(lambda: dsq_linear(x, w, b, runtime(2, 2, 2, 2, fmt="none")),
                          x, w, b, g=g)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(p, q) for p, q in zip(grads_none, grads_ref))


def test_stochastic_rounding_reproducible_from_seed_and_differs_across_seeds():
    x, w, b, g = linear_inputs(6)
    outs = []
    for seed in (11, 11, 12):
        rt = runtime(4, 3, 3, 4, rounding="stochastic", seed=seed)
        outs.append(grads(lambda rt=rt: dsq_linear(x, w, b, rt), x, w, b, g=g))
    (y1, g1), (y2, g2), (y3, _) = outs
    assert torch.equal(y1, y2) and all(torch.equal(p, q) for p, q in zip(g1, g2))
    assert not torch.equal(y1, y3)


def test_observer_sees_every_gemm_with_its_shape():
    x, w, b, _ = linear_inputs(7)
    a, bb, _ = matmul_inputs(7)
    rt = runtime(4, 4, 4, 4)
    seen = []
    rt.observers.append(seen.append)
    dsq_linear(x, w, b, rt, name="fc")
    dsq_matmul(a, bb, rt, name="qk")
    assert [(r.kind, r.name, r.batch, r.m, r.k, r.n, r.training) for r in seen] == [
        ("linear", "fc", 1, 15, 12, 7, True),
        ("matmul", "qk", 6, 5, 8, 9, True),
    ]


@pytest.mark.parametrize("level", [(16, 4, 4, 16), (8, 3, 3, 8), (2, 2, 2, 16)])
def test_equal_q1_q2_skips_requantizing_the_stash_bit_identically(level):
    """With q2 == q1 (BFP, nearest) backward skips ``Q2(stash)``: BFP is idempotent, so the
    gradients must equal the DESIGN.md formulas *bit for bit*, Q2 applied explicitly."""
    q0, q1, q2, q3 = level
    x, w, b, g = linear_inputs(seed=3)
    x.data[0, 0, :4] = torch.tensor([float("inf"), 1e-39, -0.0, 3.0])  # saturation, subnormal
    _, (gx, gw, _) = grads(
        lambda: _DSQLinearFunction.apply(x, w, b, runtime(*level)), x, w, b, g=g
    )
    x2, g2, wd = x.detach().reshape(-1, 12), g.reshape(-1, 7), w.detach()
    w_stash = bfp(wd, q1, 0)
    assert torch.equal(gx, bfp(bfp(g2, q2, -1) @ bfp(w_stash, q2, 0), q3, -1).view(3, 5, 12))
    assert torch.equal(gw, bfp(g2, q3, 0).t() @ bfp(x2, q1, 0))

    a, bm, gm = matmul_inputs()
    _, (ga, gb) = grads(lambda: _DSQMatmulFunction.apply(a, bm, runtime(*level)), a, bm, g=gm)
    a_stash, b_stash = bfp(a.detach(), q1, -2), bfp(bm.detach(), q1, -1)
    assert torch.equal(ga, bfp(bfp(gm, q2, -1) @ bfp(b_stash, q2, -1).transpose(-1, -2), q3, -1))
    assert torch.equal(gb, bfp(bfp(a_stash, q2, -2).transpose(-1, -2) @ bfp(gm, q2, -2), q3, -2))


@pytest.mark.parametrize("level", [(16, 4, 4, 16), (2, 2, 2, 16), (6, 3, 5, 4)])
@pytest.mark.parametrize("d", [12, 10])
def test_matmul_reads_attention_head_views_in_place(level, d):
    """``Q K^T`` and ``P V`` on head views (``[T, B*H, d]`` transposed; ``K^T`` a permutation):
    with ``d`` a multiple of the block the operands are quantized and stashed in their own
    layout (:func:`head_storage`), otherwise copied first; either way the hand-built formulas
    on contiguous copies, and the quantized operands bit for bit."""
    from dsq_fairseq.nn.functional import _operand, head_storage, head_view

    q0, q1, q2, q3 = level
    gen = torch.Generator().manual_seed(3)
    T, S, P = 9, 7, 6
    q_rows = torch.randn(T, P, d, generator=gen, requires_grad=True)
    k_rows = torch.randn(S, P, d, generator=gen, requires_grad=True)
    v_rows = torch.randn(S, P, d, generator=gen, requires_grad=True)
    rt = runtime(*level)
    qh, kh, vh = (t.transpose(0, 1) for t in (q_rows, k_rows, v_rows))
    layouts = [head_storage(t, rt) for t in (qh, kh.transpose(1, 2), vh)]
    if d % BLOCK == 0:
        assert [st.last_is for st in layouts] == [-1, -2, -1]
    else:
        assert layouts == [None, None, None]
    for t, dims in ((qh, (-1, -2)), (kh.transpose(1, 2), (-2, -1)), (vh, (-2, -1))):
        q, stash, layout = _operand(t.detach(), *dims, rt, None)
        q_ref, stash_ref, _ = _operand(t.detach().contiguous(), *dims, rt, None)
        assert torch.equal(q, q_ref)
        from dsq_fairseq.nn.functional import unpack_stash
        got = head_view(unpack_stash(*stash, rt), layout, t.shape)
        assert torch.equal(got, unpack_stash(*stash_ref, rt))

    g_w = torch.randn(P, T, S, generator=gen)
    g_o = torch.randn(T, P, d, generator=gen)

    def run():
        w = dsq_matmul(qh, kh.transpose(1, 2), rt)
        o = dsq_matmul(torch.softmax(w, -1), vh, rt)
        return w, o.transpose(0, 1)  # [T, B*H, d]: its gradient arrives as a head view

    for t in (q_rows, k_rows, v_rows):
        t.grad = None
    w, o = run()
    torch.autograd.backward([w, o], [g_w, g_o])
    got = [w.detach(), o.detach()] + [t.grad.clone() for t in (q_rows, k_rows, v_rows)]

    def ref_matmul(a, b, g):
        a_stash, b_stash = bfp(a, q1, -2), bfp(b, q1, -1)
        c = bfp(a, q0, -1) @ bfp(b, q0, -2)
        ga = bfp(bfp(g, q2, -1) @ bfp(b_stash, q2, -1).transpose(-1, -2), q3, -1)
        gb = bfp(bfp(a_stash, q2, -2).transpose(-1, -2) @ bfp(g, q2, -2), q3, -2)
        return c, ga, gb

    qc, kc, vc = (t.detach().transpose(0, 1).contiguous() for t in (q_rows, k_rows, v_rows))
    w_ref = bfp(qc, q0, -1) @ bfp(kc.transpose(1, 2).contiguous(), q0, -2)
    pw = torch.softmax(w_ref, -1).requires_grad_(True)
    o_ref, g_p, g_v = ref_matmul(pw.detach(), vc, g_o.transpose(0, 1).contiguous())
    (g_w_total,) = torch.autograd.grad(torch.softmax(w_ref.requires_grad_(True), -1), w_ref, g_p)
    _, g_q, g_kt = ref_matmul(qc, kc.transpose(1, 2).contiguous(), g_w + g_w_total)
    want = [w_ref, o_ref.transpose(0, 1), g_q.transpose(0, 1), g_kt.permute(2, 0, 1),
            g_v.transpose(0, 1)]
    # the reference's GEMMs run on contiguous copies, the DSQ ones on views: BLAS may pick other
    # kernels for other layouts (seen with MKL on AMD Zen 3) and round a last bit differently,
    # which BFP turns into one quantization step where it lands on a rounding tie. Allow one
    # step of the widest format (16 bits: 2^-14 of a block maximum, at most the tensor's).
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=max(1e-5, 2.0**-14 * b.abs().max().item()))


def test_linears_reading_one_input_share_its_q0_inside_a_block(monkeypatch):
    """Within ``runtime.sharing_inputs()`` the second and third linear reading the same tensor
    reuse its ``Q0(x)`` (no quantizer call), with outputs and gradients bit for bit those of
    separate linears; outside a block, after the input changed in place, and with stochastic
    rounding nothing is shared."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(20, 3, 32, generator=gen)
    ws = [torch.randn(16, 32, generator=gen) for _ in range(3)]
    gs = [torch.randn(20, 3, 16, generator=gen) for _ in range(3)]

    def run(shared, rounding="nearest"):
        rt = DSQRuntime(QuantScheme("bfp", rounding=rounding), Precision(16, 4, 4, 16), seed=2)
        x = x0.clone().requires_grad_(True)
        w = [t.clone().requires_grad_(True) for t in ws]
        calls = []  # Q0 quantizations of x itself (the pair kernel reads x2, a view)
        real = QuantScheme.quantize

        def counting(self, t, *a, **k):
            if t is x:
                calls.append(1)
            return real(self, t, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(QuantScheme, "quantize", counting)
            if shared:
                with rt.sharing_inputs():
                    ys = [dsq_linear(x, wi, None, rt) for wi in w]
            else:
                ys = [dsq_linear(x, wi, None, rt) for wi in w]
        torch.autograd.backward(ys, gs)
        return [y.detach() for y in ys] + [x.grad] + [wi.grad for wi in w], len(calls)

    plain, n_plain = run(False)
    shared, n_shared = run(True)
    assert n_plain - n_shared == 2  # the second and third linear quantize nothing
    for a, b in zip(plain, shared):
        assert torch.equal(a, b)
    _, n_stochastic = run(True, "stochastic")
    assert n_stochastic == 3
    rt = runtime(16, 4, 4, 16)
    x = x0.clone()
    with rt.sharing_inputs():
        key = (16, tuple(x.shape), rt.scheme)
        rt.offer_q0(x, key, x)
        assert rt.shared_q0(x, key) is x
        x.add_(1)  # a new version: no longer the tensor Q0 was computed from
        assert rt.shared_q0(x, key) is None
    assert rt.shared_q0(x, key) is None and rt._q0_shared is None
