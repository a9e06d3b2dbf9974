"""The fused fast quantizers (:mod:`dsq_fairseq.quant.fast`) are bit-identical to the eager
references, and the hot path (``QuantScheme.quantize``) uses them.

"Bit-identical" is checked on the raw bits (``view`` as integers), so ``-0.0`` vs ``0.0`` and NaN
payloads count. Stochastic rounding is compared with two generators seeded alike: same values and
the same generator state afterwards (the same random stream was consumed). Inputs mix scales per
block, all-zero blocks, exact rounding ties, NaN, +-inf, subnormals and values near the fp32
maximum. Shapes are small and few graph kinds are compiled, to keep compile time low.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dsq_fairseq import quant as ref
from dsq_fairseq.precision import QuantScheme
from dsq_fairseq.quant import fast, native

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}


@pytest.fixture(autouse=True, params=["native", "compiled"])
def _fast_on(request, monkeypatch):
    """Every test twice: with the native CPU kernels (:mod:`.native`, where this CPU has them)
    and with the ``torch.compile`` paths alone (the CUDA path, and CPUs with neither AVX-512
    nor AVX2)."""
    was = fast.enabled()
    fast.set_enabled(True)
    monkeypatch.setattr(native, "_enabled", request.param == "native")
    if request.param == "native" and not native.available(torch.ones(1)):
        pytest.skip("native CPU kernels not available here (no AVX-512/AVX2 or no C compiler)")
    yield request.param
    fast.set_enabled(was)


def assert_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous()
    a, e = actual.view(INT_VIEW[actual.dtype]), expected.view(INT_VIEW[expected.dtype])
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].tolist()
        raise AssertionError(f"bits differ at {bad}: {actual[tuple(bad[0])]} vs "
                             f"{expected[tuple(bad[0])]}")


def nasty(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Random values with per-row scales spanning 2^-30..2^30 plus the special cases."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if x.dim() >= 1 and x.numel() > 1:
        scale = torch.exp2(torch.randint(-30, 31, (shape[0],) + (1,) * (len(shape) - 1),
                                         generator=g).float())
        x = x * scale
        flat = x.view(-1)
        n = flat.numel()
        idx = torch.randperm(n, generator=g)
        k = max(1, n // 40)
        flat[idx[:k]] = torch.round(flat[idx[:k]] * 4) / 4 + 0.5  # ties for small steps
        if n >= 32:
            flat[idx[k:k + 2]] = float("nan")
            flat[idx[k + 2]] = float("inf")
            flat[idx[k + 3]] = float("-inf")
            flat[idx[k + 4:k + 6]] = torch.tensor([1e-40, -3e-42])  # fp32 subnormals
            flat[idx[k + 6]] = 3.0e38
            flat[:20] = 0.0  # an all-zero block (or more)
    return x.to(dtype)


def both(fn_name: str, x: torch.Tensor, *args, seed=None, **kw):
    """(fast result, reference result); with ``seed`` both get a generator seeded alike, and the
    generators must end in the same state."""
    kf, kr = dict(kw), dict(kw)
    if seed is not None:
        gf, gr = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        kf.update(rounding="stochastic", generator=gf)
        kr.update(rounding="stochastic", generator=gr)
    out = getattr(fast, fn_name)(x, *args, **kf), getattr(ref, fn_name)(x, *args, **kr)
    if seed is not None:
        assert torch.equal(gf.get_state(), gr.get_state())
    return out


BFP_SHAPES = [((7, 37), -1), ((8, 48), -1), ((37, 6), 0), ((3, 20, 5), 1), ((2, 3, 33), -1),
              ((5,), 0), ((), 0)]


def test_nan_free_inputs_take_the_flagged_reduction_and_nan_inputs_the_nan_free_one(monkeypatch):
    """On CPU the factor graphs first reduce plain ``|x|`` with a NaN flag (fast._factors); the
    NaN-free graph runs only when a block held a NaN, and the elementwise pass drops its NaN-bits
    select only when none did. Both paths must give the reference's bits."""
    monkeypatch.setattr(native, "_enabled", False)  # the compiled graphs, not the C kernels
    calls = []
    real_call = fast._call
    monkeypatch.setattr(fast, "_call", lambda key, *a: calls.append(key[0]) or real_call(key, *a))
    for has_nan in (False, True):
        for shape, dim in (((9, 40), -1), ((40, 7), 0), ((64, 32), -1)):
            x = torch.nan_to_num(nasty(shape, seed=3), nan=1.5)
            if has_nan:
                x.view(-1)[x.numel() // 2] = float("nan")
            calls.clear()
            for fn, kw in (("bfp_quantize", {"dim": dim}), ("fixed_quantize", {})):
                assert_bits(*both(fn, x, 4, **kw))
            flagged = [k for k in calls if k.endswith(fast.FLAG)]
            nan_free = [k for k in calls if k in ("bfp_factors", "bfp_factors_tail",
                                                  "fixed_factors")]
            assert len(flagged) == 2 and len(nan_free) == (2 if has_nan else 0), calls
            applies = [k for k in calls if k.startswith("pow2_apply")]
            assert len(applies) == 2, calls
            assert all(k.endswith(fast.NAN_FREE) != has_nan for k in applies), calls


@pytest.mark.parametrize("stochastic", [False, True])
def test_bfp_bit_identical(stochastic):
    for i, (shape, dim) in enumerate(BFP_SHAPES):
        # every (width, exponent bits) pair is its own set of compiles: the narrowest and the
        # widest mantissa, an odd block size, and a narrow exponent field (clamped E) at the
        # stash width only, to keep the suite's time
        for width, block in ((2, 16), (4, 16), (8, 5), (31, 16)):
            for dtype in DTYPES:
                for e in ((8, 4) if width == 4 else (8,)):
                    x = nasty(shape, dtype, seed=i)
                    got, want = both("bfp_quantize", x, width, exponent_bits=e, block_size=block,
                                     dim=dim, seed=i if stochastic else None)
                    assert_bits(got, want)


@pytest.mark.parametrize("stochastic", [False, True])
def test_fixed_bit_identical(stochastic):
    for i, shape in enumerate([(9, 13), (64,), (4, 4, 4)]):
        for width in (2, 4, 16, 30):
            for dtype in DTYPES:
                x = nasty(shape, dtype, seed=i)
                got, want = both("fixed_quantize", x, width, seed=i if stochastic else None)
                assert_bits(got, want)
    for x in (torch.zeros(5, 3), torch.full((3, 3), float("nan")), torch.tensor([1e-45, 0.0])):
        assert_bits(*both("fixed_quantize", x, 4))


@pytest.mark.parametrize("stochastic", [False, True])
def test_int_bit_identical(stochastic):
    cases = [((9, 13), "tensor", -1), ((9, 13), "token", -1), ((9, 13), "channel", 0),
             ((3, 5, 7), "token", 1)]
    for i, (shape, granularity, dim) in enumerate(cases):
        for width in (2, 4, 16):
            for dtype in DTYPES:
                x = nasty(shape, dtype, seed=i)
                got, want = both("int_quantize", x, width, granularity=granularity, dim=dim,
                                 seed=i if stochastic else None)
                assert_bits(got, want)
    z = torch.zeros(4, 6)
    z[1] = torch.tensor([1e-45, 0, 0, 0, 0, 0])  # scale underflows to 0 -> row of zeros
    assert_bits(*both("int_quantize", z, 4, granularity="token"))


def test_fast_path_keeps_reference_contract():
    x = torch.randn(6, 16, requires_grad=True)
    y = fast.bfp_quantize(x, 4)
    assert not y.requires_grad and y.is_contiguous()
    assert fast.bfp_quantize(x, 32) is x and fast.int_quantize(x, 32) is x
    x64 = torch.randn(5, 7, dtype=torch.float64)  # fp64 and empty tensors go to the reference
    assert_bits(fast.bfp_quantize(x64, 4), ref.bfp_quantize(x64, 4))
    assert fast.fixed_quantize(torch.empty(0, 3), 4).shape == (0, 3)
    with pytest.raises(ValueError, match="width"):
        fast.bfp_quantize(x, 1)
    with pytest.raises(ValueError, match="rounding"):
        fast.int_quantize(x, 4, rounding="up")


def test_disabled_and_compile_failure_fall_back(monkeypatch):
    x = nasty((4, 32))
    calls = []
    monkeypatch.setattr(fast, "_get_compiled", lambda key: calls.append(key))
    fast.set_enabled(False)
    assert_bits(fast.bfp_quantize(x, 4), ref.bfp_quantize(x, 4))
    assert not calls  # disabled: never asked for a compiled function
    fast.set_enabled(True)

    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fast, "_get_compiled", lambda key: broken)
    key = ("fixed_factors", "cpu", fast._constants(4, 8))
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert_bits(fast.fixed_quantize(x, 4), ref.fixed_quantize(x, 4))
    assert fast._compiled.pop(key, "missing") is None  # marked broken: reference from now on


def test_quant_scheme_dispatches_by_size(monkeypatch):
    monkeypatch.setattr(native, "_enabled", False)  # native BFP: any size (test_quant_native)
    used = []
    real = fast.bfp_quantize
    monkeypatch.setattr(fast, "bfp_quantize", lambda *a, **k: used.append(1) or real(*a, **k))
    scheme = QuantScheme("bfp")
    x = nasty((8, 40))
    monkeypatch.setattr(fast, "_warmup_numel", 0)
    monkeypatch.setattr(fast, "_min_numel", x.numel() + 1)
    assert_bits(scheme.quantize(x, 4, dim=-1), ref.bfp_quantize(x, 4, dim=-1))
    assert not used  # below the threshold: the reference
    monkeypatch.setattr(fast, "_min_numel", x.numel())
    assert_bits(scheme.quantize(x, 4, dim=0), ref.bfp_quantize(x, 4, dim=0))
    assert used
    fast.set_enabled(False)
    assert not fast.wanted(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in (QuantScheme("fixed"), QuantScheme("int", int_granularity="token")):
            monkeypatch.setattr(fast, "_min_numel", 0)
            fast.set_enabled(True)
            got = s.quantize(x, 4, dim=-1)
            fast.set_enabled(False)
            assert_bits(got, s.quantize(x, 4, dim=-1))


def test_warm_up_sends_the_first_elements_to_the_reference(monkeypatch):
    x = torch.ones(4, 16)
    monkeypatch.setattr(fast, "_min_numel", 1)
    monkeypatch.setattr(fast, "_warmup_numel", 2 * x.numel())
    monkeypatch.setattr(fast, "_eager_numel", 0)
    assert [fast.wanted(x) for _ in range(4)] == [False, False, True, True]
    assert not fast.wanted(torch.ones(3, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton fast path)")
@pytest.mark.parametrize("stochastic", [False, True])
def test_cuda_fast_paths_bit_identical(stochastic):
    """On CUDA the same graphs compile to Triton; same bits, no host round trips."""
    for i, (shape, dim) in enumerate([((7, 37), -1), ((37, 6), 0), ((3, 20, 5), 1)]):
        for dtype in DTYPES:
            x = nasty(shape, dtype, seed=i).cuda()
            for name, args, kw in (("bfp_quantize", (4,), {"dim": dim}),
                                   ("fixed_quantize", (4,), {}),
                                   ("int_quantize", (4,), {"granularity": "token", "dim": dim})):
                kf, kr = dict(kw), dict(kw)
                if stochastic:
                    kf.update(rounding="stochastic",
                              generator=torch.Generator("cuda").manual_seed(i))
                    kr.update(rounding="stochastic",
                              generator=torch.Generator("cuda").manual_seed(i))
                got = getattr(fast, name)(x, *args, **kf)
                want = getattr(ref, name)(x, *args, **kr)
                assert got.device == x.device
                assert_bits(got.cpu(), want.cpu())
