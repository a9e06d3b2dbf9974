"""Fused fast paths of the BFP / Fixed / Int quantizers, bit-identical to the references.

The references in :mod:`.bfp`, :mod:`.fixed` and :mod:`.integer` make ~9 passes over memory
(``abs``, ``nan_to_num``, ``amax``, two scalings, round, clamp, two scalings back, plus
``movedim``/pad copies for blocks along a non-last dim). Here the same arithmetic -- the same
IEEE operations in the same order on every element, so the same bits -- is written once as a
pure function of a pre-blocked view (``[M, B]`` for blocks along the contiguous last dim,
``[P, nblocks, B, Q]`` otherwise: no ``movedim`` copy) and compiled with ``torch.compile``
(inductor: C++/OpenMP on CPU, Triton on CUDA; block size static, every other size dynamic), which
fuses it into one kernel: a block-max reduction and the elementwise quantization, reading ``x``
about once and writing ``q`` once.

Differences from the references that do not change any value:

* NaN is excluded from the block maximum with ``where(|x| == |x|, |x|, 0)`` (vectorizes;
  ``isnan`` and float->int bit casts did not) and ``inf`` is left in it: the shared exponent
  ``floor(log2(amax))`` is read from the exponent field of ``amax`` (``field - 127``) instead of
  ``frexp``, equal for normal ``amax``; a subnormal ``amax`` gives ``-127`` (reference
  ``<= -127``), ``inf`` gives 128 (reference: 127 from the largest finite value it substitutes),
  and both clamp to ``[-(2^(e-1)-1), 2^(e-1)-1]`` alike. Int clamps ``amax`` to the largest finite
  fp32 after the reduction, as the reference's ``nan_to_num`` does before it;
* NaN outputs take the input's NaN bits (vectorized clamp returns all-ones NaNs);
* on CPU the block maxima are first taken of plain ``|x|`` (NaN propagated) with a flag, and
  the NaN-free reduction reruns only when some block held a NaN (:func:`_factor_graph`);
  without one, the elementwise pass leaves out the NaN-bits select (:func:`_pow2_apply`);
* ``w``-dependent constants are baked into each graph as Python numbers (one compile per width
  and exponent-bits pair; 0-d tensor inputs made the kernels ~1.8x slower). Only as operands of
  ``clamp`` and arithmetic: a baked float used as a ``torch.where`` branch was seen reused
  across graphs of different widths (dynamo's unspecialized floats), giving wrong results;
* bf16/fp16 inputs are converted to fp32 before the graph and the result back after it (the
  references compute in fp32 too): the graphs are fp32-only;
* stochastic rounding draws the reference's key (:func:`.rounding.draw_key`) and its ``u``
  (:func:`.rounding.uniform_like`, indexed in ``x``'s layout) eagerly, and passes a blocked
  view of ``u`` into the compiled function; on CPU with AVX-512 or AVX2 the native BFP kernel
  computes the same ``u`` in registers from the key instead (no tensor of random numbers).

fp64, empty tensors and ``width == 32`` go to the reference functions. Any failure of
``torch.compile`` (no compiler, unsupported backend) disables the fast path for that variant with
one warning and returns the reference result. ``DSQ_FAST=0`` in the environment (or
:func:`set_enabled`) turns all fast paths off. The hot path (``QuantScheme.quantize``) asks
:func:`wanted` per tensor: small tensors and a warm-up of the first ~``2**27`` elements stay on the
reference, so short runs of tiny models never compile. ``tests/test_quant_fast.py`` checks every
path bit for bit against the reference.

Known headroom: the BFP kernels stay compute-bound (per-block exponent arithmetic) rather than
memory-bound on CPU; see README "Speed" for the measured fractions of ``torch.clone`` bandwidth.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as v
from . import native
from ._blocks import pad_rows
from ._blocks import pnq as _pnq
from .bfp import _exp2_halves, shared_exponent_from_bits
from .bfp import bfp_quantize as ref_bfp_quantize
from .fixed import FIXED_EXPONENT_BITS
from .fixed import fixed_quantize as ref_fixed_quantize
from .integer import int_quantize as ref_int_quantize
from .rounding import draw_key, uniform_like

__all__ = [
    "bfp_quantize", "enabled", "fixed_quantize", "int_quantize", "min_numel", "set_enabled",
    "set_min_numel", "wanted",
]

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_enabled: bool = os.environ.get("DSQ_FAST", "1").strip().lower() not in ("0", "false", "off", "")
_min_numel: int = int(os.environ.get("DSQ_FAST_MIN_NUMEL", str(2 ** 17)))
_warmup_numel: int = int(os.environ.get("DSQ_FAST_WARMUP_NUMEL", str(2 ** 27)))
_eager_numel: int = 0  # elements :func:`wanted` has sent to the reference during the warm-up
_compiled: Dict[Tuple, Optional[Callable]] = {}


def enabled() -> bool:
    """Whether the fast paths are used (``DSQ_FAST=0`` or :func:`set_enabled` turn them off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fast paths on or off for this process (overrides ``DSQ_FAST``)."""
    global _enabled
    _enabled = bool(flag)


def min_numel() -> int:
    """Smallest tensor (elements) for which :func:`wanted` picks the fast path; default
    ``2**17``, or ``DSQ_FAST_MIN_NUMEL``. Below it the eager reference is as fast, and a short run
    of a tiny model never pays for compiling."""
    return _min_numel


def set_min_numel(n: int, warmup_numel: Optional[int] = None) -> None:
    """Set :func:`min_numel` (and, if given, the warm-up of :func:`wanted`, restarting it) for
    this process."""
    global _min_numel, _warmup_numel, _eager_numel
    _min_numel = max(0, int(n))
    if warmup_numel is not None:
        _warmup_numel, _eager_numel = max(0, int(warmup_numel)), 0


def wanted(x: Tensor) -> bool:
    """Whether callers that choose per tensor (``QuantScheme.quantize``) should use this module
    for ``x``: fast paths enabled, ``x`` a fp32/bf16/fp16 tensor with ``>= min_numel()``
    elements, and the warm-up done: the first ``DSQ_FAST_WARMUP_NUMEL`` (default ``2**27``)
    elements of such tensors in this process go to the reference, so that only a run whose
    quantization work is worth it (the eager cost of ~``2**27`` elements, ~1-2 s on 2 CPU cores,
    is about that of compiling) pays for compiling; short test runs of tiny models never do.
    (The functions here take the fast path whenever enabled, whatever the size.)"""
    global _eager_numel
    if not (_enabled and isinstance(x, Tensor) and x.dtype in _FAST_DTYPES):
        return False
    n = x.numel()
    if n < max(_min_numel, 1):
        return False
    if _eager_numel < _warmup_numel:
        _eager_numel += n
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Pure functions compiled by torch.compile. Each mirrors its reference op for op.


_FP32_MAX = torch.finfo(torch.float32).max


def _nan_free_abs(xc: Tensor) -> Tensor:
    """``|x|`` with NaN -> 0 (``a == a`` is false only for NaN; it vectorizes, ``isnan`` and
    float->int bit casts did not). ``inf`` stays ``inf``: the callers map it as
    :func:`.bfp.nan_free_abs` does (largest finite fp32) after the reduction, where it is cheap."""
    a = xc.abs()
    return torch.where(a == a, a, 0.0)


def _input_nan(q: Tensor, x: Tensor) -> Tensor:
    """NaN elements of ``q`` (exactly the NaN elements of ``x``) carry ``x``'s NaN bits, as the
    reference's do: vectorized ``clamp`` (max/min) returned all-ones NaNs, the eager one the
    input's."""
    return torch.where(q == q, q, x)


def _round(y: Tensor, u: Optional[Tensor]) -> Tensor:
    """:func:`.rounding.apply_rounding_`: half-to-even, or ``floor(y) + (u < y - floor(y))``."""
    if u is None:
        return torch.round(y)
    lo = torch.floor(y)
    return lo + (u < (y - lo)).to(y.dtype)


def _pow2_factors(amax, wm2, emax):
    """Per block: the scale-up halves and their reciprocals of :func:`.bfp.pow2_block_quantize`
    (``2^((w-2)-E)`` as two exact powers of two, so no step overflows)."""
    e = shared_exponent_from_bits(amax, emax)
    up_a, up_b = _exp2_halves(wm2 - e, torch.float32)
    return up_a, up_b, torch.reciprocal(up_a), torch.reciprocal(up_b)


def _pow2_apply(xb, u, up_a, up_b, down_a, down_b, qmax, nan_free: bool = False):
    """:func:`.bfp.pow2_block_quantize`'s elementwise part for fp32 ``xb`` (same operations, same
    order); the factors broadcast over each block. ``nan_free``: ``xb`` is known to hold no NaN
    (:func:`_factors` said so), so no output is NaN and :func:`_input_nan` is left out (~20% of
    the kernel on cache-resident tensors)."""
    y = xb * up_a
    y = y * up_b
    y = _round(y, u)
    y = torch.clamp(y, -qmax, qmax)
    y = y * down_a
    y = y * down_b
    return y if nan_free else _input_nan(y, xb)


def _bfp_factors(xb, wm2, emax, axis: int):
    """Factors of every block of pre-blocked fp32 ``xb``: ``[M, B]`` (``axis=1``, blocks along
    the contiguous last dim) or ``[P, nblocks, B, Q]`` (``axis=2``); keepdim shapes. All
    reshaping happens outside (views, free): reshapes of symbolic shapes inside the graph were
    seen to cost an extra strided copy."""
    return _pow2_factors(_block_amax("bfp_factors", (xb, axis)), wm2, emax)


FLAG = "+flag"
"""Suffix of a factor graph's CPU variant: maxima of plain ``|x|`` and a NaN flag
(:func:`_factor_graph`)."""
NAN_FREE = "+nan_free"
"""Suffix of an elementwise graph's variant for inputs without NaN (:func:`_pow2_apply`)."""
FACTOR_KINDS = ("bfp_factors", "bfp_factors_tail", "fixed_factors")


def _block_amax(kind: str, args: Tuple, magnitude: Callable = _nan_free_abs) -> Tensor:
    """The maxima of ``magnitude(x)`` that the factor graph ``kind`` (:data:`FACTOR_KINDS`)
    reduces: per block along ``axis`` (``bfp_factors``, ``args = (xb, axis)``), per block of
    :func:`_tail_split`'s views (``bfp_factors_tail``, ``(full, tail)``) or over the whole tensor
    (``fixed_factors``, ``(x1,)``)."""
    if kind == "bfp_factors_tail":
        return _split_amax(args[0], args[1], magnitude)
    if kind == "fixed_factors":
        return magnitude(args[0]).amax()
    return magnitude(args[0]).amax(dim=args[1], keepdim=True)


def _factor_graph(kind: str, args: Tuple, wm2, emax, flagged: bool):
    """The factor graph ``kind`` (:data:`FACTOR_KINDS`) on ``args``: four factors per block.
    ``flagged`` (the ``kind + FLAG`` variant): block maxima of plain ``|x|`` (NaN propagated)
    and one more output, ``True`` when any maximum is NaN. Without NaN in ``x`` every maximum
    equals the NaN-free one bit for bit; with one, :func:`_factors` reruns the NaN-free graph.
    On CPU the per-element compare-and-blend of :func:`_nan_free_abs` took half of the
    reduction kernel's time (``[131072, 16]`` blocks along the last dim: 1.20 -> 0.59 ms; along
    dim 0 ~8% less)."""
    if not flagged:
        return _pow2_factors(_block_amax(kind, args), wm2, emax)
    amax = _block_amax(kind, args, torch.abs)
    return (*_pow2_factors(amax, wm2, emax), torch.isnan(amax).any())


def _factors(key: Tuple, *args: Tensor) -> Tuple[Optional[Tuple[Tensor, ...]], str]:
    """The factor graph of ``key`` on ``args`` (see :func:`_call`; ``None`` if it can't compile)
    and the suffix of the elementwise graph to use with them: on CPU the ``FLAG`` variant of
    :func:`_factor_graph` first, and, when no block maximum was NaN, :data:`NAN_FREE`; else the
    NaN-free reduction and ``""``. (Not on CUDA, where reading the flag would synchronise the
    stream.)"""
    if args[-1].device.type == "cpu":
        out = _call((key[0] + FLAG, *key[1:]), *args)
        if out is not None and not out[-1].item():
            return out[:-1], NAN_FREE
    return _call(key, *args), ""


def _tail_split(x: Tensor, block: int) -> Tuple[Optional[Tensor], Tensor]:
    """Views of ``x`` (``[P, n]``: blocks along the last dim, or ``[P, n, Q]``) with a short tail
    block: the whole blocks ``[P, n // B, B(, Q)]`` (``None`` when ``n < B``) and the tail
    ``[P, n % B(, Q)]``. No copy: the reductions read them in place."""
    full = x.shape[1] // block
    tail = x[:, full * block:]
    if not full:
        return None, tail
    return x[:, : full * block].view(x.shape[0], full, block, *x.shape[2:]), tail


def _dynamic_factor(t: Tensor, dims: Tuple[int, ...]) -> Tensor:
    """:func:`_dynamic` for a per-block factor: of ``dims``, those it has and that aren't 1."""
    return _dynamic(t, tuple(d for d in dims if d < t.dim() and t.shape[d] != 1))


def _dynamic_full(full: Optional[Tensor]) -> Optional[Tensor]:
    """:func:`_dynamic` for :func:`_tail_split`'s whole blocks: every size varies but ``B``."""
    return None if full is None else _dynamic(full, (0, 1, 3)[: full.dim() - 1])


def _split_amax(full: Optional[Tensor], tail: Tensor, magnitude: Callable) -> Tensor:
    """Block maxima ``[P, nblocks, 1(, Q)]`` of ``magnitude(x)`` from :func:`_tail_split`'s
    views: the whole blocks' and the tail block's reductions, concatenated. (Zero-padding inside
    the graph instead became a masked load that ran ~3x slower.)"""
    amax_tail = magnitude(tail).amax(dim=1, keepdim=True).unsqueeze(1)
    if full is None:
        return amax_tail
    return torch.cat([magnitude(full).amax(dim=2, keepdim=True), amax_tail], dim=1)


def _per_element(f: Tensor, x: Tensor, block: int) -> Tensor:
    """A per-block factor (``[P, nblocks, 1(, Q)]``) indexed per element of the unpadded ``x``
    (``[P, n(, Q)]``): a broadcast view, so the elementwise kernel reads the factor of element
    ``i`` at block ``i // B`` and writes ``x``'s shape directly (no padded output, no slice
    copy)."""
    p, nblocks = f.shape[0], f.shape[1]
    if x.dim() == 2:
        return f.expand(p, nblocks, block).reshape(p, nblocks * block)[:, : x.shape[1]]
    q = x.shape[2]
    return f.expand(p, nblocks, block, q).reshape(p, nblocks * block, q)[:, : x.shape[1]]


def _fixed_factors(x1, wm2, emax):
    return _pow2_factors(_block_amax("fixed_factors", (x1,)), wm2, emax)


def _uniform(key: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """:func:`.rounding.uniform_like`, from the native kernel where it runs (same bits)."""
    if native.available_for(key):
        return native.uniform(key, tuple(shape))
    return uniform_like(key, shape)


def _int_core(x3, u3, qmax, per_vector: bool):
    """Int on ``x3 [P, N, Q]``: one scale per tensor, or per vector along ``N``."""
    xc = x3.to(torch.float32)
    a = _nan_free_abs(xc)
    amax = torch.clamp(a.amax(dim=1, keepdim=True) if per_vector else a.amax(), max=_FP32_MAX)
    scale = amax / qmax
    y = xc / torch.where(scale == 0, 1.0, scale)
    y = _round(y, u3)
    y = torch.clamp(y, -qmax, qmax)
    y = y * scale
    return _input_nan(y, xc).to(x3.dtype)


def _specialise(key: Tuple) -> Callable:
    """A fresh function (own code object, so its own dynamo cache and recompile budget) for
    ``key``, with the structural constants (reduction axis, granularity) and the number-format
    constants (``key[-1]``: ``(w - 2, 2^(w-1) - 1, 2^(e-1) - 1)``) baked in as Python values:
    the generated kernel then folds them (measured ~1.8x faster than 0-d tensor inputs, at the
    price of one compile per width / exponent-bits pair)."""
    kind, (wm2, qmax, emax) = key[0], key[-1]
    nan_free = kind.endswith(NAN_FREE)
    kind = kind[: -len(NAN_FREE)] if nan_free else kind
    flagged = kind.endswith(FLAG)
    kind = kind[: -len(FLAG)] if flagged else kind
    if kind in FACTOR_KINDS:  # bfp_factors: key[1] is the axis, appended to the args
        extra = (key[1],) if kind == "bfp_factors" else ()

        def fn(*args):
            return _factor_graph(kind, (*args, *extra), wm2, emax, flagged)
    elif kind == "pow2_apply_tail":
        block = key[1]

        def fn(x, up_a, up_b, down_a, down_b):
            return _pow2_apply(x, None, *(_per_element(f, x, block)
                                          for f in (up_a, up_b, down_a, down_b)), qmax, nan_free)
    elif kind == "bfp_fused":  # one graph (stochastic rounding: measured faster than two)
        axis = key[1]

        def fn(x, u):
            return _pow2_apply(x, u, *_bfp_factors(x, wm2, emax, axis), qmax)
    elif kind == "fixed_fused":
        def fn(x, u):
            return _pow2_apply(x, u, *_fixed_factors(x, wm2, emax), qmax)
    elif kind == "pow2_apply":
        def fn(x, u, up_a, up_b, down_a, down_b):
            return _pow2_apply(x, u, up_a, up_b, down_a, down_b, qmax, nan_free)
    else:
        per_vector = key[1]

        def fn(x, u):
            return _int_core(x, u, qmax, per_vector)
    return _named(fn, key)


def _named(fn: Callable, key: Tuple) -> Callable:
    """A copy of ``fn`` with its own code object (so its own dynamo cache and recompile budget),
    named after ``key``."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__,
                              f"dsq_fast_{'_'.join(map(str, key))}", fn.__defaults__,
                              fn.__closure__)


def _dynamic(t: Optional[Tensor], dims: Tuple[int, ...]) -> Optional[Tensor]:
    """``t`` for a compiled call: ``dims`` marked as varying, so the first compile is already
    shape-generic (sizes 0 and 1 still specialise: dynamo's rule)."""
    if t is None:
        return None
    if t._base is not None:  # a view: alias its storage without the view relation, else
        # dynamo guards on the base's shape and recompiles when only the base changed
        t = torch.empty((0,), dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


COMPILE_OPTIONS = {"cpp.dynamic_threads": True}
"""Inductor options of every fast-path graph. ``cpp.dynamic_threads``: every CPU kernel gets an
OpenMP parallel loop, whatever the size its graph was first compiled for. Without it inductor
decides serial-or-parallel from the first call's sizes (the hint of each dynamic dim), so a
graph first compiled on a small tensor -- or served from the on-disk cache, filled by the
tests' small tensors -- ran every later large tensor on one thread (``[1048576, 16]`` BFP
apply: 37 -> 22 ms on 2 cores)."""


def compile_fn(fn: Callable) -> Callable:
    """``torch.compile`` as every fast path uses it: whole graph, dims marked dynamic by the
    caller (:func:`_dynamic`), :data:`COMPILE_OPTIONS`."""
    return torch.compile(fn, dynamic=None, fullgraph=True, options=COMPILE_OPTIONS)


def _get_compiled(key: Tuple) -> Optional[Callable]:
    """One compiled function per ``key``; ``None`` once compiling it has failed."""
    if key not in _compiled:
        _compiled[key] = compile_fn(_specialise(key))
    return _compiled[key]


def _call(key: Tuple, *args):
    """The compiled function of ``key`` on ``args``; ``None`` if it can't compile (then never
    again for ``key``, with one warning)."""
    fn = _get_compiled(key)
    if fn is not None:
        try:
            with torch.no_grad():
                return fn(*args)
        except Exception as exc:  # compile failure: fall back to the reference for this key
            warnings.warn(f"dsq fast quantizer {key} unavailable ({type(exc).__name__}: {exc}); "
                          "using the reference implementation", RuntimeWarning, stacklevel=4)
            _compiled[key] = None
    return None


def _run(key: Tuple, reference: Callable, *args) -> Tensor:
    out = _call(key, *args)
    return reference() if out is None else out


def _run_pow2(factors_key: Tuple, reference: Callable, xb: Tensor, ub: Optional[Tensor],
              dyn: Tuple[int, ...]) -> Tensor:
    """BFP / Fixed as two kernels: a reduction writing four factors per block, then one
    elementwise pass. (One fused graph recomputed the per-block exponent arithmetic for every
    element -- int bit casts that don't vectorize -- and ran at up to half the speed; with
    stochastic rounding the fused graph measured faster, so that one stays fused.)
    ``factors_key[-1]``: the format constants (:func:`_constants`)."""
    if ub is not None:
        fused_key = (factors_key[0].replace("_factors", "_fused"), *factors_key[1:])
        return _run(fused_key, reference, xb, ub)
    factors, suffix = _factors(factors_key, xb)
    if factors is None:
        return reference()
    factors = [_dynamic_factor(f, dyn) for f in factors]
    out = _call(("pow2_apply" + suffix, *factors_key[:-1], ub is not None, factors_key[-1]), xb,
                ub, *factors)
    return reference() if out is None else out


def _run_tail(x: Tensor, block: int, key_tail: Tuple, reference: Callable) -> Tensor:
    """BFP with round-to-nearest of ``x`` (``[P, n]`` blocked along the last dim or
    ``[P, n, Q]`` along ``n``) when ``n`` is not a multiple of ``block``: the two kernels of
    :func:`_run_pow2` on the unpadded ``x``: whole blocks and the tail reduced in place
    (:func:`_tail_split`) and each element's factor read through :func:`_per_element`, instead
    of a zero-padded copy in and a slice copy out (measured ~2x faster on attention-sized
    tensors). ``key_tail``: ``(device, constants)``."""
    dims = tuple(range(x.dim()))
    full, tail = _tail_split(x, block)
    factors, suffix = _factors(("bfp_factors_tail", block, *key_tail),
                               _dynamic_full(full), _dynamic(tail, dims))
    if factors is None:
        return reference()
    factors = [_dynamic_factor(f, (0, 1, 3)) for f in factors]
    out = _call(("pow2_apply_tail" + suffix, block, *key_tail), _dynamic(x, dims), *factors)
    return reference() if out is None else out


def _constants(width: int, exponent_bits: int) -> Tuple[int, float, int]:
    """``(w - 2, 2^(w-1) - 1, 2^(e-1) - 1)``: the constants a compiled graph bakes in."""
    return width - 2, float(2 ** (width - 1) - 1), 2 ** (exponent_bits - 1) - 1


def _fp32(x: Tensor) -> Tensor:
    """``x`` detached, contiguous, in fp32: the graphs are fp32-only (one compile serves
    fp32/bf16/fp16; the references compute bf16/fp16 in fp32 too and cast back at the end)."""
    return x.detach().to(torch.float32).contiguous()


def bfp_quantize_(x: Tensor, width: int, exponent_bits: int = 8, block_size: int = 16,
                  dim: int = -1) -> Tensor:
    """:func:`bfp_quantize` round-to-nearest written over ``x`` (returned) where the native
    kernel takes ``x`` (a contiguous CPU fp32 tensor that needs no gradient); otherwise the
    result is a new tensor as from :func:`bfp_quantize`. Same values bit for bit. For callers
    that own ``x`` and drop it afterwards (a GEMM's fresh output): no second buffer."""
    if (_enabled and isinstance(x, Tensor) and native.available(x) and x.is_contiguous()
            and not x.requires_grad):
        width, exponent_bits, block_size, dim = v.check_bfp(x, width, exponent_bits,
                                                            block_size, dim)
        if width == 32:
            return x
        return native.bfp_quantize(x, width, exponent_bits, block_size, dim, inplace=True)
    return bfp_quantize(x, width, exponent_bits, block_size, dim)


def bfp_quantize(
    x: Tensor,
    width: int,
    exponent_bits: int = 8,
    block_size: int = 16,
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fast :func:`dsq_fairseq.quant.bfp_quantize`: same signature, same result bit for bit."""

    def reference() -> Tensor:
        return ref_bfp_quantize(x, width, exponent_bits, block_size, dim, rounding, generator)

    if not (_enabled and isinstance(x, Tensor) and x.dtype in _FAST_DTYPES and x.numel() > 0):
        return reference()
    width, exponent_bits, block_size, dim = v.check_bfp(x, width, exponent_bits, block_size, dim)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    xd = _fp32(x)
    stochastic = rounding == "stochastic"
    if not stochastic and native.available(xd):  # CPU, AVX-512 or AVX2: one C kernel (.native)
        out = native.bfp_quantize(xd, width, exponent_bits, block_size, dim)
        return out.view(x.shape).to(x.dtype)
    p, n, q = _pnq(xd.shape, dim)
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    u3 = None
    if stochastic:  # the reference's stream: one key, u indexed in x's own layout
        key = draw_key(generator, xd.device)
        if native.available(xd):
            out = native.bfp_quantize(xd, width, exponent_bits, block_size, dim, key=key)
            return out.view(x.shape).to(x.dtype)
        u3 = uniform_like(key, (p, n, q))  # no native kernels for xd here
    x3 = xd.view(p, n, q)
    if pad and not stochastic:
        # a short tail block: reduced apart from the whole blocks, no padded copy
        out = _run_tail(x3 if q > 1 else x3.view(p, n), block_size,
                        (x.device.type, _constants(width, exponent_bits)), reference)
        return out.view(x.shape).to(x.dtype)
    if pad:  # stochastic: blocks zero-padded (x and u alike; u of a zero is never used)
        x3 = pad_rows(x3, pad)
        u3 = pad_rows(u3, pad)
    if q == 1:  # blocks along the contiguous last dim: rows [M, B]
        xb = x3.view(p * nblocks, block_size)
        ub = None if u3 is None else u3.view(p * nblocks, block_size)
        axis, dyn = 1, (0,)
    else:
        xb = x3.view(p, nblocks, block_size, q)
        ub = None if u3 is None else u3.view(p, nblocks, block_size, q)
        axis, dyn = 2, (0, 1, 3)
    # sizes vary from call to call; the block size stays a compile-time constant
    out = _run_pow2(("bfp_factors", axis, x.device.type, _constants(width, exponent_bits)),
                    reference, _dynamic(xb, dyn), _dynamic(ub, dyn), dyn)
    if pad:
        out = out.view(p, nblocks * block_size, q)[:, :n]
    return out.contiguous().view(x.shape).to(x.dtype)


def fixed_quantize(
    x: Tensor,
    width: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fast :func:`dsq_fairseq.quant.fixed_quantize`: same signature, same result bit for bit."""

    def reference() -> Tensor:
        return ref_fixed_quantize(x, width, rounding, generator)

    if not (_enabled and isinstance(x, Tensor) and x.dtype in _FAST_DTYPES and x.numel() > 0):
        return reference()
    width = v.check_width(width)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    xd = _fp32(x)
    stochastic = rounding == "stochastic"
    u1 = None
    if stochastic:
        u1 = _uniform(draw_key(generator, xd.device), (xd.numel(),))
    out = _run_pow2(("fixed_factors", x.device.type, _constants(width, FIXED_EXPONENT_BITS)),
                    reference, _dynamic(xd.view(-1), (0,)), _dynamic(u1, (0,)), (0,))
    return out.view(x.shape).to(x.dtype)


def int_quantize(
    x: Tensor,
    width: int,
    granularity: str = "tensor",
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fast :func:`dsq_fairseq.quant.int_quantize`: same signature, same result bit for bit."""

    def reference() -> Tensor:
        return ref_int_quantize(x, width, granularity, dim, rounding, generator)

    if not (_enabled and isinstance(x, Tensor) and x.dtype in _FAST_DTYPES and x.numel() > 0):
        return reference()
    width = v.check_width(width)
    granularity = v.check_granularity(granularity)
    dim = v.check_dim(x, dim)
    rounding = v.check_rounding(rounding)
    generator = v.check_generator(generator)
    if width == 32:
        return x
    xd = _fp32(x)
    per_vector = granularity != "tensor"
    p, n, q = _pnq(xd.shape, dim) if per_vector else (1, xd.numel(), 1)
    stochastic = rounding == "stochastic"
    u3 = None
    if stochastic:  # the reference draws in the shape of x (of [1] for a 0-d x per vector)
        shape = (1,) if (xd.dim() == 0 and per_vector) else xd.shape
        u3 = _uniform(draw_key(generator, xd.device), tuple(shape)).view(p, n, q)
    key = ("int", per_vector, stochastic, x.device.type, _constants(width, 8))
    out = _run(key, reference, _dynamic(xd.view(p, n, q), (0, 1, 2)), _dynamic(u3, (0, 1, 2)))
    return out.view(x.shape).to(x.dtype)
