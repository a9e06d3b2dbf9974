"""DSQ GEMMs as autograd functions: where q0..q3 sit (DESIGN.md §2).

Linear, ``y = x W^T + b`` with ``x: [..., K]``, ``W: [N, K]``::

    forward    y  = Q0(x) @ Q0(W)^T + b            Q0 blocks along K (the forward reduction dim)
    stash      x~ = Q1(x)  blocks along tokens     W~ = Q1(W) blocks along N
    backward   dx = Q3( Q2(g) @ Q2(W~) )            Q2(g) along N, Q2(W~) along N, Q3 along K
               dW = Q3(g)^T @ x~                    Q3(g) along tokens (the reduction dim)
               db = sum(g)                          full precision

Matmul of two activations, ``C = A @ B`` with ``A: [..., m, k]``, ``B: [..., k, n]``::

    forward    C  = Q0(A) @ Q0(B)                   both along k
    stash      A~ = Q1(A) along m                   B~ = Q1(B) along n
    backward   dA = Q3( Q2(g) @ Q2(B~)^T )          Q2 along n, Q3 along k
               dB = Q3( Q2(A~)^T @ Q2(g) )          Q2 along m, Q3 along k

Blocks always follow the reduction dimension of the GEMM that consumes the tensor; a gradient
output is blocked like the forward operand it is the gradient of. Weights enter as the
full-precision master copy: quantized values never leak into parameters or their gradients'
storage. Under ``torch.no_grad`` (inference) only Q0 runs and nothing is stashed.

Packed stash (``runtime.packs_stash(q1)``, ``--dsq-packed-stash``): each stash is kept as
:class:`~dsq_fairseq.quant.packing.PackedTensor` codes + exponents/scales (saved with
``save_for_backward``, so freed after backward like any saved tensor) and unpacked in backward,
bit-identical to the fake-quantized fp32 stash. A stash that can't be packed (NaN/inf, MX,
non-fp32) stays fp32. With round-to-nearest, the linears that read the same input tensor object
(q/k/v projections of self-attention, k/v of cross-attention) share one packed ``Q1(x)``, and a
linear keeps no copy of its weight at all: it saves the master weight (held anyway) and
recomputes ``Q1(W)`` in backward (:class:`Requantize`; deterministic, so bit-identical).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from dsq_fairseq.nn import logits, weight_cache
from dsq_fairseq.nn.runtime import DSQRuntime, GemmRecord
from dsq_fairseq.precision import FULL_PRECISION, Point, Precision
from dsq_fairseq.quant import fast, fast_pack, native
from dsq_fairseq.quant.packing import PackedTensor, pack

UNQUANTIZED = Precision(*[FULL_PRECISION] * 4)


def _needs_backward(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _q0_linear(x, weight, bias, runtime: DSQRuntime) -> torch.Tensor:
    """The forward GEMM of a linear: ``Q0(x) @ Q0(W)^T + b``, both blocked along K.

    ``Q0(W)`` comes from :mod:`~dsq_fairseq.nn.weight_cache`: computed once per update (per
    validation round), not once per micro-batch, while the weight is unchanged.
    """
    return _q0_linear_with_input(x, weight, bias, runtime)[0]


def _q0_linear_with_input(x, weight, bias, runtime: DSQRuntime,
                          xq: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(Q0(x) @ Q0(W)^T + b, Q0(x))``: :func:`_q0_linear` and its quantized input.

    ``Q0(x)`` is ``xq`` when the caller has it (any shape of ``x``'s elements), else the one
    another linear of the current :meth:`DSQRuntime.sharing_inputs` block computed for this
    very ``x``, else computed here; it is then offered to the rest of that block.
    """
    p, scheme, gen = runtime.precision, runtime.scheme, runtime.generator(x.device)
    key = (p.q0, scheme)
    if xq is None:
        xq = runtime.shared_q0(x, key)
    if xq is None:
        xq = scheme.quantize(x, p.q0, dim=-1, generator=gen)
    runtime.offer_q0(x, key, xq)
    wq = weight_cache.quantize_weight(runtime, weight, p.q0, -1, gen)
    return F.linear(xq.view(x.shape), wq, bias), xq


def _q0_matmul(a, b, runtime: DSQRuntime) -> torch.Tensor:
    """The forward GEMM of an activation matmul: ``Q0(A) @ Q0(B)``, both blocked along k."""
    p, scheme, gen = runtime.precision, runtime.scheme, runtime.generator(a.device)
    return torch.matmul(
        scheme.quantize(a, p.q0, dim=-1, generator=gen),
        scheme.quantize(b, p.q0, dim=-2, generator=gen),
    )


Stash = Tuple[Tuple[torch.Tensor, ...], Optional[tuple]]
"""A q1 stash: ``((q,), None)`` (fp32) or ``(packed.tensors(), packed.meta())``."""


def _stash(
    x: torch.Tensor,
    width: Point,
    dim: int,
    runtime: DSQRuntime,
    generator: Optional[torch.Generator],
    is_weight: bool = False,
    share_with: Optional[torch.Tensor] = None,
    packed: Optional[bool] = None,
) -> Stash:
    """``Q1(x)`` blocked along ``dim``, packed when ``packed`` (default: when the runtime says
    so, ``runtime.packs_stash(width)``).

    ``share_with``: the tensor object ``x`` is a view of; another stash of that same object
    (same version, width, blocking) reuses this one's packed tensors (round-to-nearest only:
    stochastic rounding draws fresh numbers for every quantization, and so must stay).
    """
    scheme = runtime.scheme
    if not (runtime.packs_stash(width) if packed is None else packed):
        return (scheme.quantize(x, width, dim=dim, is_weight=is_weight, generator=generator),), None
    return _pack_stash(x, width, dim, runtime, generator, is_weight, share_with)


def _pack_stash(
    x: torch.Tensor,
    width: Point,
    dim: int,
    runtime: DSQRuntime,
    generator: Optional[torch.Generator],
    is_weight: bool = False,
    share_with: Optional[torch.Tensor] = None,
    q: Optional[torch.Tensor] = None,
) -> Stash:
    """The packed half of :func:`_stash`; ``q``: ``Q(x)`` at ``width`` along ``dim`` when the
    caller already has it (round-to-nearest; not recomputed)."""
    scheme = runtime.scheme
    key = None
    if share_with is not None and scheme.rounding == "nearest":
        key = _share_key(x, width, runtime, dim, is_weight)
        hit = runtime.stash_lookup(share_with, key)
        if hit is not None:
            return hit
    packed = None
    if scheme.format == "bfp" and scheme.rounding == "nearest":
        # quantize-and-pack without an fp32 Q1(x) (None: NaN/inf, odd shapes): one C kernel at
        # any size where it runs (from Q(x) when given: quantizing it again gives Q(x) itself,
        # so these are its codes), else compiled kernels once fast.wanted says they pay
        src = x if q is None else q
        if ((native.available(src) and native.supports_pack(src.shape, width))
                or (q is None and fast.wanted(x))):
            packed = fast_pack.bfp_pack(src, width, scheme.exponent_bits, scheme.block_size, dim)
    if packed is None:
        if q is None:
            q = scheme.quantize(x, width, dim=dim, is_weight=is_weight, generator=generator)
        packed = pack(q, scheme.format, width, dim=dim, block_size=scheme.block_size,
                      exponent_bits=scheme.exponent_bits, x=x,
                      int_granularity=scheme.int_granularity_for(is_weight))
    if packed is None:
        return (q,), None
    stash = packed.tensors(), packed.meta()
    if key is not None:
        runtime.stash_store(share_with, key, *stash)
    return stash


def _share_key(x: torch.Tensor, width: Point, runtime: DSQRuntime, dim: int = 0,
               is_weight: bool = False) -> tuple:
    """What two stashes of one tensor object must share to be one (:func:`_pack_stash`)."""
    return (width, dim, is_weight, tuple(x.shape), runtime.scheme)


def _stash_shared(x: torch.Tensor, width: Point, share_with: torch.Tensor,
                  runtime: DSQRuntime) -> bool:
    """Whether another linear already stored the packed ``Q1(x)`` of ``share_with``."""
    return (runtime.scheme.rounding == "nearest"
            and runtime.stash_lookup(share_with, _share_key(x, width, runtime)) is not None)


def _share_stash(x: torch.Tensor, width: Point, share_with: torch.Tensor, runtime: DSQRuntime,
                 stash: Stash) -> None:
    """Offer ``stash`` (the packed ``Q1(x)``) to the other linears reading ``share_with``."""
    runtime.stash_store(share_with, _share_key(x, width, runtime), *stash)


class Requantize(NamedTuple):
    """Stash meta of a weight kept as the master weight itself: ``Q1(W)`` is recomputed in
    backward (``scheme.quantize(W, width, dim, is_weight=True)``), bit-identical because
    round-to-nearest is deterministic and autograd's version check forbids changing ``W`` in
    between. No extra bytes: the parameter is held anyway."""

    width: Point
    dim: int


def _weight_stash(weight: torch.Tensor, width: Point, runtime: DSQRuntime,
                  generator: Optional[torch.Generator]) -> Stash:
    """``Q1(W)`` blocked along N: with packing and round-to-nearest, the master weight itself
    (:class:`Requantize`); else as :func:`_stash` (stochastic rounding: packed)."""
    if runtime.packs_stash(width) and runtime.scheme.rounding == "nearest":
        return (weight,), Requantize(width, 0)
    return _stash(weight, width, 0, runtime, generator, is_weight=True)


def _stash_q2(stash: torch.Tensor, p: Precision, dim: int, runtime: DSQRuntime,
              generator: Optional[torch.Generator], is_weight: bool = False) -> torch.Tensor:
    """``Q2(stash)`` of a q1 stash that was blocked along the same ``dim``.

    BFP and Fixed with round-to-nearest are idempotent (DESIGN.md §1: a quantized block keeps
    its shared exponent, every element is already on its grid), so with ``q2 == q1`` the stash
    *is* ``Q2(stash)`` bit for bit and the pass is skipped. Int (the scale is recomputed from a
    rounded maximum), MX, stochastic rounding (it would consume random numbers) and
    ``q2 != q1`` quantize as usual.
    """
    scheme = runtime.scheme
    if p.q2 == p.q1 and scheme.rounding == "nearest" and scheme.format in ("bfp", "fixed"):
        return stash
    return scheme.quantize(stash, p.q2, dim=dim, is_weight=is_weight, generator=generator)


def _quantize_pair(t: torch.Tensor, width_last: Point, width_outer: Point, runtime: DSQRuntime,
                   pack_outer: bool = False):
    """``(Q(t) along -1 at width_last, Q(t) along -2 at width_outer)`` in one pass over ``t``
    (:func:`~dsq_fairseq.quant.native.bfp_pair`; the second packed as a :data:`Stash` when
    ``pack_outer``, ``None`` for a non-finite ``t``), or ``None`` where that kernel does not
    apply: BFP round-to-nearest with blocks of 16, both widths quantized (2..31; packing: 2, 4
    or 8), a CPU fp32 ``t`` whose last dim is a multiple of 16 (:func:`native.supports_pair`).
    Bit-identical to the two ``scheme.quantize`` calls (and :func:`_pack_stash`)."""
    scheme = runtime.scheme
    if not (scheme.format == "bfp" and scheme.rounding == "nearest"
            and isinstance(width_last, int) and isinstance(width_outer, int)
            and 2 <= width_last < FULL_PRECISION and 2 <= width_outer < FULL_PRECISION
            and (not pack_outer or width_outer in native.PACK_WIDTHS)
            and native.supports_pair(t, scheme.block_size)):
        return None
    q_last, outer = native.bfp_pair(t, width_last, width_outer, scheme.exponent_bits,
                                    pack_outer=pack_outer)
    if pack_outer and outer is not None:
        outer = outer, (t.shape, width_outer, "pow2", t.dim() - 2, 16, True)
    return q_last, outer


def _save_stashes(ctx, *stashes: Stash) -> None:
    ctx.save_for_backward(*(t for tensors, _ in stashes for t in tensors))
    ctx.stash_layout = tuple((len(tensors), meta) for tensors, meta in stashes)


def unpack_stash(tensors: Tuple[torch.Tensor, ...], meta,
                 runtime: Optional[DSQRuntime]) -> torch.Tensor:
    """The fp32 values of one stash (``tensors``, ``meta`` as :func:`_stash` made them;
    ``runtime``: needed for :class:`Requantize` stashes only)."""
    if meta is None:
        return tensors[0]
    if isinstance(meta, Requantize):
        return runtime.scheme.quantize(tensors[0], meta.width, dim=meta.dim, is_weight=True)
    return PackedTensor(*tensors, *meta).unpack()


def _load_stashes(ctx) -> Tuple[torch.Tensor, ...]:
    saved, out, i = ctx.saved_tensors, [], 0
    for n, meta in ctx.stash_layout:
        tensors, i = saved[i:i + n], i + n
        out.append(unpack_stash(tensors, meta, getattr(ctx, "runtime", None)))
    return tuple(out)


class _DSQLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, runtime: DSQRuntime,  # type: ignore[override]
                q0_sink: Optional[list] = None):
        p = runtime.precision
        gen = runtime.generator(x.device)
        x2 = x.reshape(-1, x.shape[-1])
        pair = x_stash = None
        packs = runtime.packs_stash(p.q1)
        if q0_sink is None and not (packs and _stash_shared(x2, p.q1, x, runtime)):
            # Q0(x) along K and Q1(x) along tokens (packed or not) in one pass over x
            pair = _quantize_pair(x2, p.q0, p.q1, runtime, pack_outer=packs)
        xq = None
        if pair is not None:
            xq, outer = pair
            if outer is not None and packs:
                x_stash = outer
                _share_stash(x2, p.q1, x, runtime, x_stash)
            elif outer is not None:
                x_stash = (outer,), None
        # k/v after q inside an attention block: Q0(x) is known (runtime.sharing_inputs)
        y, xq = _q0_linear_with_input(x, weight, bias, runtime, xq)
        if q0_sink is not None:  # the output projection: Q0(x) for recomputing the logits
            q0_sink.append(_pack_stash(x2, p.q0, -1, runtime, gen,
                                       q=xq.reshape(x2.shape)))
        if x_stash is None:
            x_stash = _stash(x2, p.q1, 0, runtime, gen, share_with=x)
        _save_stashes(ctx, x_stash, _weight_stash(weight, p.q1, runtime, gen))
        ctx.runtime, ctx.precision, ctx.has_bias = runtime, p, bias is not None
        ctx.x_shape = x.shape
        # both gradients from one read of grad_y (not for the output projection, where the
        # second [tokens, vocab] temporary would raise the peak memory of backward)
        ctx.pair_grads = q0_sink is None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_stash, w_stash = _load_stashes(ctx)
        runtime, p = ctx.runtime, ctx.precision
        scheme, gen = runtime.scheme, runtime.generator(grad_y.device)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        g2 = g3 = None  # Q2(g) along N, Q3(g) along tokens
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and ctx.pair_grads:
            g2, g3 = _quantize_pair(g, p.q2, p.q3, runtime) or (None, None)
        if ctx.needs_input_grad[0]:
            if g2 is None:
                g2 = scheme.quantize(g, p.q2, dim=-1, generator=gen)
            dx = g2.mm(_stash_q2(w_stash, p, 0, runtime, gen, is_weight=True))
            del g2
            # dx is this call's own fresh GEMM output: Q3 may overwrite it
            grad_x = scheme.quantize(dx, p.q3, dim=-1, generator=gen, overwrite=True)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if g3 is None:
                g3 = scheme.quantize(g, p.q3, dim=0, generator=gen)
            grad_w = g3.t().mm(x_stash)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


def dsq_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    runtime: DSQRuntime,
    name: str = "",
    keep_q0_input: bool = False,
) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias[N]`` with q0..q3 placed as in the module docstring.

    ``keep_q0_input`` (the output projection): in training, also keep ``Q0(x)`` packed at q0 and
    attach it to the result (:mod:`~dsq_fairseq.nn.logits`), so that the log-softmax over it need
    not keep its ``[tokens, vocab]`` output (when lossless: ``logits.wants_source``).
    """
    training = _needs_backward(x, weight, bias)
    if runtime.observers:
        m = x.numel() // x.shape[-1]
        runtime.observe(
            GemmRecord("linear", name, 1, m, x.shape[-1], weight.shape[0], runtime.precision,
                       training)
        )
    if not runtime.active:
        return F.linear(x, weight, bias)
    if not training:
        return _q0_linear(x, weight, bias, runtime)
    if not (keep_q0_input and logits.wants_source(runtime, x)):
        return _DSQLinearFunction.apply(x, weight, bias, runtime)
    sink: list = []
    y = _DSQLinearFunction.apply(x, weight, bias, runtime, sink)
    return logits.attach_source(y, sink[0], x.shape, weight, bias, runtime, runtime.precision)


class HeadStorage(NamedTuple):
    """A 3-D operand ``t [P, m, n]`` that is a permuted view of a contiguous tensor, as the
    attention's head views are: ``s``, that tensor as 2-D ``[rows, P * cols]`` (no copy), and
    which dim of ``t`` is ``s``'s contiguous last dim (``last_is``; the other of ``t``'s two
    matrix dims runs along ``s``'s rows).

    * ``last_is == -1``: ``t == s.view(m, P, n).transpose(0, 1)`` (``[T, B*H, d]`` -> heads);
    * ``last_is == -2``: ``t == s.view(n, P, m).permute(1, 2, 0)`` (the keys' ``K^T``).

    Quantizing ``t`` along one of its matrix dims is quantizing ``s`` along the matching dim,
    block for block, when blocks never straddle two heads: BFP round-to-nearest with the
    ``last_is`` extent a multiple of the block size (:func:`head_storage`). So the matmul
    quantizes and stashes head views without first copying them into ``[P, m, n]`` order.
    """

    s: torch.Tensor
    last_is: int
    shape: torch.Size

    def sdim(self, tdim: int) -> int:
        """The dim of ``s`` (``-1`` or ``0``) along which ``t``'s dim ``tdim`` (-1/-2) runs."""
        return -1 if tdim == self.last_is else 0

    def view(self, u: torch.Tensor) -> torch.Tensor:
        """``u`` (laid out as ``s``) as a ``[P, m, n]`` view, the way ``t`` views ``s``."""
        return head_view(u, self.last_is, self.shape)


def head_view(u: torch.Tensor, last_is: Optional[int], shape: torch.Size) -> torch.Tensor:
    """:meth:`HeadStorage.view` from its parts (``last_is=None``: ``u`` is ``t``'s own layout)."""
    if last_is is None:
        return u
    P, m, n = shape
    if last_is == -1:
        return u.view(m, P, n).transpose(0, 1)
    return u.view(n, P, m).permute(1, 2, 0)


def head_storage(t: torch.Tensor, runtime: DSQRuntime) -> Optional[HeadStorage]:
    """The :class:`HeadStorage` of a non-contiguous 3-D ``t`` whose quantization it can stand
    for (BFP, round-to-nearest, the ``last_is`` extent a multiple of the block size), else
    ``None`` (the caller makes ``t`` contiguous)."""
    scheme = runtime.scheme
    if (t.dim() != 3 or t.is_contiguous() or scheme.format != "bfp"
            or scheme.rounding != "nearest"):
        return None
    P, m, n = t.shape
    if t.stride() == (n, P * n, 1) and n % scheme.block_size == 0:
        return HeadStorage(t.transpose(0, 1).reshape(m, P * n), -1, t.shape)
    if t.stride() == (m, 1, P * m) and m % scheme.block_size == 0:
        return HeadStorage(t.permute(2, 0, 1).reshape(n, P * m), -2, t.shape)
    return None


def _operand(t: torch.Tensor, q_dim: int, stash_dim: int, runtime: DSQRuntime,
             generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, Stash, Optional[int]]:
    """``(Q0(t) along q_dim, the Q1 stash along stash_dim, its layout)`` of a matmul operand
    (dims ``-1``/``-2`` of ``t``): one pass over ``t`` for both where the pair kernel applies
    (the quantized dim contiguous, the stash along rows), a head view read in place
    (:func:`head_storage`; the stash then holds ``s`` and its layout is ``last_is``, else
    ``None``), bit-identical to quantizing ``t.contiguous()``."""
    p = runtime.precision
    packs = runtime.packs_stash(p.q1)
    st = head_storage(t, runtime)
    if st is None:
        t = t.contiguous()
        src, q_sdim, stash_sdim, last_is = t, q_dim, stash_dim, None
    else:
        src, q_sdim, stash_sdim, last_is = st.s, st.sdim(q_dim), st.sdim(stash_dim), st.last_is
    if q_sdim == -1 and stash_sdim in (0, -2):
        pair = _quantize_pair(src, p.q0, p.q1, runtime, pack_outer=packs)
        if pair is not None and pair[1] is not None:
            q, outer = pair
            return (head_view(q, last_is, t.shape), outer if packs else ((outer,), None),
                    last_is)
    q = runtime.scheme.quantize(src, p.q0, dim=q_sdim, generator=generator)
    stash = _stash(src, p.q1, stash_sdim, runtime, generator)
    return head_view(q, last_is, t.shape), stash, last_is


class _DSQMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, runtime: DSQRuntime):  # type: ignore[override]
        p = runtime.precision
        gen = runtime.generator(a.device)
        # Q0(a) along k with Q1(a) along m; Q0(b) along k with Q1(b) along n. Attention hands
        # in transposed head views: read in place where the blocks allow (head_storage), else
        # one contiguous copy each here instead of one in every quantizer that reads them
        if runtime.scheme.rounding == "nearest":
            qa, a_stash, a_layout = _operand(a, -1, -2, runtime, gen)
            qb, b_stash, b_layout = _operand(b, -2, -1, runtime, gen)
            c = torch.matmul(qa, qb)
        else:  # stochastic: the random draws in their documented order, Q0(a) Q0(b) Q1(a) Q1(b)
            a, b = a.contiguous(), b.contiguous()
            c = _q0_matmul(a, b, runtime)
            a_stash, b_stash = _stash(a, p.q1, -2, runtime, gen), _stash(b, p.q1, -1, runtime, gen)
            a_layout = b_layout = None
        _save_stashes(ctx, a_stash, b_stash)
        ctx.layouts = ((a_layout, a.shape), (b_layout, b.shape))
        ctx.runtime, ctx.precision = runtime, p
        return c

    @staticmethod
    def backward(ctx, grad_c):  # type: ignore[override]
        a_stash, b_stash = (head_view(u, last_is, shape) for u, (last_is, shape)
                            in zip(_load_stashes(ctx), ctx.layouts))
        runtime, p = ctx.runtime, ctx.precision
        scheme, gen = runtime.scheme, runtime.generator(grad_c.device)
        grad_a = grad_b = None
        g_n = g_m = None  # Q2(grad_c) along n, along m: one pass when both are needed
        st = head_storage(grad_c, runtime)
        if st is None:
            grad_c = grad_c.contiguous()  # quantized twice below (along n and along m)
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            if st is None:
                g_n, g_m = _quantize_pair(grad_c, p.q2, p.q2, runtime) or (None, None)
            elif st.last_is == -1:  # grad of P V: [T, B*H, d] rows, read in place
                pair = _quantize_pair(st.s, p.q2, p.q2, runtime)
                if pair is not None:
                    g_n, g_m = st.view(pair[0]), st.view(pair[1])
        if ctx.needs_input_grad[0]:
            if g_n is None:
                g_n = scheme.quantize(grad_c, p.q2, dim=-1, generator=gen)
            da = torch.matmul(g_n, _stash_q2(b_stash, p, -1, runtime, gen).transpose(-1, -2))
            del g_n
            grad_a = scheme.quantize(da, p.q3, dim=-1, generator=gen, overwrite=True)
        if ctx.needs_input_grad[1]:
            if g_m is None:
                g_m = scheme.quantize(grad_c, p.q2, dim=-2, generator=gen)
            db = torch.matmul(_stash_q2(a_stash, p, -2, runtime, gen).transpose(-1, -2), g_m)
            grad_b = scheme.quantize(db, p.q3, dim=-2, generator=gen, overwrite=True)
        return grad_a, grad_b, None


def dsq_matmul(
    a: torch.Tensor, b: torch.Tensor, runtime: DSQRuntime, name: str = "", quantize: bool = True
) -> torch.Tensor:
    """``a [..., m, k] @ b [..., k, n]`` (same leading dims) with q0..q3 as in the docstring.

    ``quantize=False`` (``--dsq-skip-attention-matmul``) runs the plain matmul; observers still
    see it, at full precision, so the cost model counts it.
    """
    training = _needs_backward(a, b)
    if runtime.observers:
        batch = a.numel() // (a.shape[-1] * a.shape[-2])
        runtime.observe(
            GemmRecord("matmul", name, batch, a.shape[-2], a.shape[-1], b.shape[-1],
                       runtime.precision if quantize else UNQUANTIZED, training)
        )
    if not quantize or not runtime.active:
        return torch.matmul(a, b)
    if not training:
        return _q0_matmul(a, b, runtime)
    return _DSQMatmulFunction.apply(a, b, runtime)


__all__: Tuple[str, ...] = ("dsq_linear", "dsq_matmul")
