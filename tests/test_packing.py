"""Packed low-bit stash (``dsq_fairseq.quant.packing``): lossless, bit-identical round trips."""

import pytest
import torch

from dsq_fairseq.quant import bfp_quantize, fixed_quantize, int_quantize
from dsq_fairseq.quant.packing import PackedTensor, pack, pack_bits, unpack_bits


def bits(t):
    return t.contiguous().view(torch.int32)


def assert_bit_identical(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def tricky(shape, seed=0):
    """Random data with wide exponents, exact zeros, negative zeros, subnormals and ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-30, 30, shape, generator=gen).float()
    )
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=gen)
    flat[idx[: n // 10]] = 0.0
    flat[idx[n // 10: n // 5]] = -0.0
    flat[idx[n // 5: n // 5 + 5]] = torch.tensor([1e-40, -3e-42, 2.5, -0.5, 1.5])
    return x


@pytest.mark.parametrize("width", range(1, 17))
def test_bit_stream_round_trip(width):
    gen = torch.Generator().manual_seed(width)
    for n in (1, 7, 8, 13, 100):
        codes = torch.randint(0, 2 ** width, (n,), generator=gen, dtype=torch.int32)
        data = pack_bits(codes, width)
        assert data.dtype == torch.uint8 and data.numel() == -(-n // 8) * width
        assert torch.equal(unpack_bits(data, width, n), codes)


def test_bit_stream_layout():
    # w=4: low nibble first; w=3: element j at bits [3j, 3j+3) of a little-endian integer
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03, 0, 0]
    assert pack_bits(torch.tensor([5, 6, 7, 1, 0, 0, 0, 0]), 3).tolist() == [0xF5, 0x03, 0x00]


@pytest.mark.parametrize("width", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("shape,dim", [((37, 20), 0), ((37, 20), 1), ((3, 17, 5), 1),
                                       ((4, 9, 33), -1), ((50,), 0)])
@pytest.mark.parametrize("block,ebits", [(16, 8), (5, 4), (1, 8)])
def test_bfp_round_trip_is_bit_identical(width, shape, dim, block, ebits):
    x = tricky(shape, seed=width + block)
    q = bfp_quantize(x, width, exponent_bits=ebits, block_size=block, dim=dim)
    packed = pack(q, "bfp", width, dim=dim, block_size=block, exponent_bits=ebits)
    assert packed is not None and packed.codes.dtype == torch.uint8
    assert packed.scales.dtype == torch.int8
    assert_bit_identical(packed.unpack(), q)
    nblocks_total = packed.scales.numel()
    assert packed.nbytes == -(-x.numel() // 8) * width + nblocks_total


def test_bfp_stochastic_and_clamped_exponents_round_trip():
    x = tricky((64, 24), seed=3)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), 1e38])
    x[5] = 1e-44  # below 2^-emax even for e=8
    for ebits in (2, 3, 8):
        gen = torch.Generator().manual_seed(ebits)
        q = bfp_quantize(x, 4, exponent_bits=ebits, block_size=8, dim=0, rounding="stochastic",
                         generator=gen)
        packed = pack(q, "bfp", 4, dim=0, block_size=8, exponent_bits=ebits)
        assert_bit_identical(packed.unpack(), q)


@pytest.mark.parametrize("width", [2, 4, 7, 16])
def test_fixed_round_trip_is_bit_identical(width):
    for seed in range(3):
        x = tricky((23, 11), seed=seed)
        q = fixed_quantize(x, width)
        packed = pack(q, "fixed", width)
        assert packed.scales.numel() == 1 and packed.scales.dtype == torch.int8
        assert_bit_identical(packed.unpack(), q)
    zero = torch.zeros(5, 3)
    assert_bit_identical(pack(fixed_quantize(-zero, 4), "fixed", 4).unpack(), -zero)


@pytest.mark.parametrize("width", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("gran,dim", [("tensor", -1), ("channel", -1), ("token", 0)])
def test_int_round_trip_is_bit_identical(width, gran, dim):
    for seed in range(3):
        x = tricky((19, 14), seed=seed) if seed else torch.randn(19, 14) * 1e-39
        q = int_quantize(x, width, granularity=gran, dim=dim)
        packed = pack(q, "int", width, dim=dim, x=x, int_granularity=gran)
        assert packed.scales.dtype == torch.float32
        assert_bit_identical(packed.unpack(), q)


def test_unpackable_inputs_fall_back():
    x = torch.randn(8, 16)
    q = bfp_quantize(x, 4)
    assert pack(q, "bfp", 32) is None and pack(q, "bfp", 20) is None
    assert pack(q, "mx", 4) is None
    assert pack(q.half(), "bfp", 4) is None
    assert pack(torch.empty(0, 16), "bfp", 4) is None
    x[1, 2] = float("nan")
    assert pack(bfp_quantize(x, 4), "bfp", 4) is None  # a NaN has no code
    assert pack(q, "int", 4) is None  # int needs the source tensor for its scale


def test_rebuild_from_tensors_and_meta():
    q = bfp_quantize(torch.randn(10, 6), 3, block_size=4, dim=0)
    packed = pack(q, "bfp", 3, dim=0, block_size=4)
    again = PackedTensor(*packed.tensors(), *packed.meta())
    assert_bit_identical(again.unpack(), q)


# --- the DSQ GEMMs with a packed stash -------------------------------------------------------

from dsq_fairseq.nn import DSQRuntime, dsq_linear, dsq_matmul  # noqa: E402
from dsq_fairseq.precision import DSQConfigError, Precision, QuantScheme  # noqa: E402

SCHEMES = [
    QuantScheme("bfp", block_size=4), QuantScheme("bfp", block_size=16, exponent_bits=5),
    QuantScheme("fixed"), QuantScheme("int", int_granularity="tensor"),
    QuantScheme("int", int_granularity="channel"), QuantScheme("int", int_granularity="token"),
    QuantScheme("bfp", block_size=4, rounding="stochastic"),
]


def rt(scheme, level, packing, seed=5):
    return DSQRuntime(scheme, Precision(*level), seed=seed, stash_packing=packing)


def run_linear(runtime, seed=0, nan=False, backward=True):
    gen = torch.Generator().manual_seed(seed)
    x = tricky((5, 3, 24), seed=seed).requires_grad_(True)
    if nan:
        with torch.no_grad():
            x[0, 0, 0] = float("nan")
    w = torch.randn(10, 24, generator=gen, requires_grad=True)
    b = torch.randn(10, generator=gen, requires_grad=True)
    y = dsq_linear(x, w, b, runtime)
    if backward:
        y.backward(torch.randn(y.shape, generator=gen))
    return y.grad_fn, [y.detach(), x.grad, w.grad, b.grad]


def run_matmul(runtime, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = tricky((4, 7, 9), seed=seed).requires_grad_(True)
    b = torch.randn(4, 9, 6, generator=gen, requires_grad=True)
    c = dsq_matmul(a, b, runtime)
    c.backward(torch.randn(c.shape, generator=gen))
    return [c.detach(), a.grad, b.grad]


def assert_all_bit_identical(xs, ys):
    for a, b in zip(xs, ys):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("level", [(16, 4, 4, 16), (6, 3, 5, 4), (2, 2, 2, 16), (32, 16, 8, 32)])
def test_packed_stash_backward_is_bit_identical(scheme, level):
    _, off = run_linear(rt(scheme, level, "off"))
    _, on = run_linear(rt(scheme, level, "on"))
    assert_all_bit_identical(on, off)
    assert_all_bit_identical(run_matmul(rt(scheme, level, "on")),
                             run_matmul(rt(scheme, level, "off")))


def test_packed_stash_saves_uint8_codes_and_int8_exponents():
    level = (16, 4, 4, 16)
    node, _ = run_linear(rt(QuantScheme("bfp"), level, "auto"), backward=False)
    # x: [15, 24] -> 360 codes at 4 bits + 24 exponents (blocks of 16 tokens); W: the master
    # weight itself (round-to-nearest: Q1(W) is recomputed in backward, no copy kept)
    dtypes = [t.dtype for t in node.saved_tensors]
    assert dtypes == [torch.uint8, torch.int8, torch.float32]
    assert [t.numel() for t in node.saved_tensors] == [180, 24, 240]
    assert node.saved_tensors[2].data_ptr() == node.next_functions[1][0].variable.data_ptr()
    # stochastic rounding can't recompute: W is packed too (240 codes at 4 bits + 24 exponents)
    node, _ = run_linear(rt(QuantScheme("bfp", rounding="stochastic"), level, "auto"),
                         backward=False)
    assert [t.dtype for t in node.saved_tensors] == [torch.uint8, torch.int8] * 2
    assert [t.numel() for t in node.saved_tensors] == [180, 24, 120, 24]
    node, _ = run_linear(rt(QuantScheme("bfp"), level, "off"), backward=False)
    assert [t.dtype for t in node.saved_tensors] == [torch.float32] * 2
    # auto packs only below 16 bits; "on" packs 16 too
    assert not rt(QuantScheme("bfp"), (32, 16, 4, 16), "auto").packs_stash(16)
    assert rt(QuantScheme("bfp"), (32, 16, 4, 16), "on").packs_stash(16)
    assert not rt(QuantScheme("bfp"), (32, 16, 4, 16), "on").packs_stash(32)
    with pytest.raises(DSQConfigError, match="--dsq-packed-stash"):
        DSQRuntime(QuantScheme("bfp"), Precision(16, 4, 4, 16), stash_packing="yes")


def test_unpackable_stash_falls_back_to_fp32():
    level = (16, 4, 4, 16)
    node, _ = run_linear(rt(QuantScheme("bfp"), level, "on"), nan=True, backward=False)
    assert [t.dtype for t in node.saved_tensors] == [torch.float32, torch.float32]
    _, on = run_linear(rt(QuantScheme("bfp"), level, "on"), nan=True)
    _, off = run_linear(rt(QuantScheme("bfp"), level, "off"), nan=True)
    for a, b in zip(on, off):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def qkv(runtime, x, ws):
    ys = [dsq_linear(x, w, None, runtime) for w in ws]
    return ys


def test_qkv_projections_share_one_packed_input():
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 16, generator=gen, requires_grad=True) for _ in range(3)]
    x = torch.randn(6, 2, 16, generator=gen, requires_grad=True)
    runtime = rt(QuantScheme("bfp"), (16, 4, 4, 16), "on")
    ys = qkv(runtime, x * 1.0, ws)
    codes = [y.grad_fn.saved_tensors[0] for y in ys]
    assert codes[0] is codes[1] is codes[2]  # one stash of x for q, k and v
    assert len({y.grad_fn.saved_tensors[2].data_ptr() for y in ys}) == 3  # weights differ
    sum(y.square().sum() for y in ys).backward()
    grads_on = [x.grad.clone()] + [w.grad.clone() for w in ws]
    # identical to separate fp32 stashes
    for t in [x, *ws]:
        t.grad = None
    ys = qkv(rt(QuantScheme("bfp"), (16, 4, 4, 16), "off"), x * 1.0, ws)
    sum(y.square().sum() for y in ys).backward()
    assert_all_bit_identical(grads_on, [x.grad] + [w.grad for w in ws])
    # the cache keeps nothing alive once the graph is gone
    del ys
    xin = x * 1.0
    assert runtime.stash_lookup(xin, None) is None


def test_shared_stash_not_reused_after_in_place_change_or_with_stochastic_rounding():
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(8, 16, generator=gen, requires_grad=True) for _ in range(2)]
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    runtime = rt(QuantScheme("bfp"), (16, 4, 4, 16), "on")
    xin = x * 1.0
    y0 = dsq_linear(xin, ws[0], None, runtime)
    xin.mul_(2.0)
    y1 = dsq_linear(xin, ws[1], None, runtime)
    assert y0.grad_fn.saved_tensors[0] is not y1.grad_fn.saved_tensors[0]
    stoch = rt(QuantScheme("bfp", rounding="stochastic"), (16, 4, 4, 16), "on")
    xin = x * 1.0
    y0, y1 = (dsq_linear(xin, w, None, stoch) for w in ws)
    assert y0.grad_fn.saved_tensors[0] is not y1.grad_fn.saved_tensors[0]


def test_runtime_pickles_without_its_cache():
    import pickle

    runtime = rt(QuantScheme("bfp"), (16, 4, 4, 16), "on")
    x = torch.randn(4, 16, requires_grad=True)
    y = dsq_linear(x, torch.randn(3, 16, requires_grad=True), None, runtime)
    assert y.requires_grad
    runtime.stash_store(x, "k", (x,), None)
    again = pickle.loads(pickle.dumps(runtime))
    assert again.stash_packing == "on" and again._stash_cache == {}
