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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dsq_fairseq.nn.runtime import DSQRuntime, GemmRecord
from dsq_fairseq.precision import FULL_PRECISION, Precision

UNQUANTIZED = Precision(*[FULL_PRECISION] * 4)


def _needs_backward(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _q0_linear(x, weight, bias, runtime: DSQRuntime) -> torch.Tensor:
    """The forward GEMM of a linear: ``Q0(x) @ Q0(W)^T + b``, both blocked along K."""
    p, scheme, gen = runtime.precision, runtime.scheme, runtime.generator(x.device)
    return F.linear(
        scheme.quantize(x, p.q0, dim=-1, generator=gen),
        scheme.quantize(weight, p.q0, dim=-1, is_weight=True, generator=gen),
        bias,
    )


def _q0_matmul(a, b, runtime: DSQRuntime) -> torch.Tensor:
    """The forward GEMM of an activation matmul: ``Q0(A) @ Q0(B)``, both blocked along k."""
    p, scheme, gen = runtime.precision, runtime.scheme, runtime.generator(a.device)
    return torch.matmul(
        scheme.quantize(a, p.q0, dim=-1, generator=gen),
        scheme.quantize(b, p.q0, dim=-2, generator=gen),
    )


class _DSQLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, runtime: DSQRuntime):  # type: ignore[override]
        p, scheme = runtime.precision, runtime.scheme
        gen = runtime.generator(x.device)
        y = _q0_linear(x, weight, bias, runtime)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(
            scheme.quantize(x2, p.q1, dim=0, generator=gen),
            scheme.quantize(weight, p.q1, dim=0, is_weight=True, generator=gen),
        )
        ctx.runtime, ctx.precision, ctx.has_bias = runtime, p, bias is not None
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_stash, w_stash = ctx.saved_tensors
        runtime, p = ctx.runtime, ctx.precision
        scheme, gen = runtime.scheme, runtime.generator(grad_y.device)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dx = scheme.quantize(g, p.q2, dim=-1, generator=gen).mm(
                scheme.quantize(w_stash, p.q2, dim=0, is_weight=True, generator=gen)
            )
            grad_x = scheme.quantize(dx, p.q3, dim=-1, generator=gen).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = scheme.quantize(g, p.q3, dim=0, generator=gen).t().mm(x_stash)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


def dsq_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    runtime: DSQRuntime,
    name: str = "",
) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias[N]`` with q0..q3 placed as in the module docstring."""
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
    return _DSQLinearFunction.apply(x, weight, bias, runtime)


class _DSQMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, runtime: DSQRuntime):  # type: ignore[override]
        p, scheme = runtime.precision, runtime.scheme
        gen = runtime.generator(a.device)
        c = _q0_matmul(a, b, runtime)
        ctx.save_for_backward(
            scheme.quantize(a, p.q1, dim=-2, generator=gen),
            scheme.quantize(b, p.q1, dim=-1, generator=gen),
        )
        ctx.runtime, ctx.precision = runtime, p
        return c

    @staticmethod
    def backward(ctx, grad_c):  # type: ignore[override]
        a_stash, b_stash = ctx.saved_tensors
        runtime, p = ctx.runtime, ctx.precision
        scheme, gen = runtime.scheme, runtime.generator(grad_c.device)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            da = torch.matmul(
                scheme.quantize(grad_c, p.q2, dim=-1, generator=gen),
                scheme.quantize(b_stash, p.q2, dim=-1, generator=gen).transpose(-1, -2),
            )
            grad_a = scheme.quantize(da, p.q3, dim=-1, generator=gen)
        if ctx.needs_input_grad[1]:
            db = torch.matmul(
                scheme.quantize(a_stash, p.q2, dim=-2, generator=gen).transpose(-1, -2),
                scheme.quantize(grad_c, p.q2, dim=-2, generator=gen),
            )
            grad_b = scheme.quantize(db, p.q3, dim=-2, generator=gen)
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
