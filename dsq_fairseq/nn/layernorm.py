"""Layer norm whose input is stashed quantized (``--dsq-layernorm-stash-bits W``, W < 32).

By default layer-norm inputs stay in full precision (torch keeps the fp32 input for backward).
With ``W`` in 2..16 the forward is unchanged (``native_layer_norm`` on the fp32 input, its exact
``mean`` and ``rstd`` kept), but the input kept for backward is ``Q(x)`` in the scheme's format at
``W`` bits, blocked along the normalized (last) dim, and packed like a GEMM stash
(:func:`~dsq_fairseq.nn.functional._stash`; 16 bits included, unless ``--dsq-packed-stash off``,
which keeps the same values unpacked). Backward is ``native_layer_norm_backward`` on the
unpacked ``Q(x)``: the gradients are those of the quantized input, an approximation (this is not
lossless; hence off by default).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from dsq_fairseq.nn.functional import _load_stashes, _stash
from dsq_fairseq.nn.runtime import DSQRuntime
from dsq_fairseq.precision import FULL_PRECISION


class _LayerNormQuantStash(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: List[int],
        eps: float, runtime: DSQRuntime,
    ) -> Tensor:
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        width = runtime.layernorm_stash_bits
        tensors, meta = _stash(x, width, -1, runtime, runtime.generator(x.device),
                               packed=runtime.packs_masks)  # also 16 bits with "auto"
        ctx.save_for_backward(*tensors, mean, rstd, weight, bias)
        ctx.stash_layout = ((len(tensors), meta),)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (xq,) = _load_stashes(ctx)
        mean, rstd, weight, bias = ctx.saved_tensors[-4:]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            g, xq, ctx.shape, mean, rstd, weight, bias, list(ctx.needs_input_grad[:3])
        )
        return dx, dw, db, None, None, None


class DSQLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that stashes its input quantized when ``dsq_runtime.layernorm_stash_bits``
    is below 32 (module docstring); otherwise exactly ``nn.LayerNorm``."""

    dsq_runtime: DSQRuntime

    def forward(self, x: Tensor) -> Tensor:
        runtime = self.dsq_runtime
        if (
            runtime.layernorm_stash_bits >= FULL_PRECISION
            or not torch.is_grad_enabled()
            or not (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            return super().forward(x)
        return _LayerNormQuantStash.apply(
            x, self.weight, self.bias, list(self.normalized_shape), self.eps, runtime
        )


__all__ = ["DSQLayerNorm"]
