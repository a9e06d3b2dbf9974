"""DSQ versions of ``nn.Linear`` and fairseq's ``MultiheadAttention``, and the function that
puts them into an already built model.

:func:`install_dsq` converts modules *in place* (``module.__class__`` is swapped): parameters,
their initialisation, sharing (tied embeddings) and state-dict keys stay exactly those of the
fairseq model, so a DSQ checkpoint is a fairseq checkpoint plus the schedule's buffers.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

from dsq_fairseq.nn.functional import dsq_linear, dsq_matmul
from dsq_fairseq.nn.layernorm import DSQLayerNorm
from dsq_fairseq.nn.masks import dsq_dropout, dsq_relu
from dsq_fairseq.nn.runtime import DSQRuntime


class DSQLinear(nn.Linear):
    """``nn.Linear`` whose GEMM is a DSQ GEMM (q0..q3 from ``dsq_runtime``)."""

    dsq_runtime: DSQRuntime
    dsq_name: str
    dsq_keep_q0_input: bool = False  # the output projection (dsq_fairseq.nn.logits)

    def forward(self, x: Tensor) -> Tensor:
        return dsq_linear(x, self.weight, self.bias, self.dsq_runtime, self.dsq_name,
                          keep_q0_input=self.dsq_keep_q0_input)


class DSQDropout(FairseqDropout):
    """``FairseqDropout`` that keeps a 1-bit mask for backward while ``dsq_runtime.packs_masks``
    (:func:`~dsq_fairseq.nn.masks.dsq_dropout`: same values, same RNG use, same gradients)."""

    dsq_runtime: DSQRuntime

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        if self.p > 0 and (self.training or self.apply_during_inference):
            if self.dsq_runtime.packs_masks:
                return dsq_dropout(x, self.p, inplace=inplace)
            return F.dropout(x, p=self.p, training=True, inplace=inplace)
        return x


class DSQReLU:
    """A layer's ``activation_fn`` (``F.relu``) that keeps a 1-bit mask while
    ``runtime.packs_masks`` (:func:`~dsq_fairseq.nn.masks.dsq_relu`)."""

    def __init__(self, runtime: DSQRuntime) -> None:
        self.runtime = runtime

    def __call__(self, x: Tensor) -> Tensor:
        return dsq_relu(x) if self.runtime.packs_masks else F.relu(x)


IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]


class DSQMultiheadAttention(MultiheadAttention):
    """fairseq ``MultiheadAttention`` that always takes an explicit path.

    fairseq's own ``forward`` hands training to ``F.multi_head_attention_forward``, which never
    calls the projection modules; this forward calls ``q_proj``/``k_proj``/``v_proj``/``out_proj``
    (DSQ linears) and runs ``Q K^T`` and ``P V`` as DSQ matmuls (plain ``torch.bmm`` when
    ``dsq_quantize_matmul`` is False, i.e. ``--dsq-skip-attention-matmul``). Same interface and
    incremental-decoding cache layout as the parent, so fairseq's generators work unchanged.
    """

    dsq_runtime: DSQRuntime
    dsq_name: str
    dsq_quantize_matmul: bool

    def _dsq_bmm(self, a: Tensor, b: Tensor, which: str) -> Tensor:
        return dsq_matmul(a, b, self.dsq_runtime, f"{self.dsq_name}.{which}",
                          quantize=self.dsq_quantize_matmul)

    def _heads(self, x: Tensor, batch: int) -> Tensor:
        """``[T, B, C] -> [B * heads, T, head_dim]``."""
        return x.contiguous().view(-1, batch * self.num_heads, self.head_dim).transpose(0, 1)

    def forward(  # noqa: C901 - mirrors the parent's signature and options
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: IncrementalState = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, embed_dim = query.size()
        saved_state = None
        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if static_kv and "prev_key" in saved_state:
                key = value = None  # encoder keys/values of earlier steps are cached

        # the projections reading one input share its Q0 (runtime.sharing_inputs)
        with self.dsq_runtime.sharing_inputs():
            q = self.q_proj(query)
            if self.self_attention:
                k, v = self.k_proj(query), self.v_proj(query)
            elif key is None:
                k = v = None
            else:
                k = self.k_proj(key)
                v = self.v_proj(key if self.encoder_decoder_attention else value)
        q = q * self.scaling

        if self.bias_k is not None:
            k, v, attn_mask, key_padding_mask = self._add_bias(
                k, v, attn_mask, key_padding_mask, bsz
            )
        q = self._heads(q, bsz)
        if k is not None:
            k, v = self._heads(k, k.size(1)), self._heads(v, v.size(1))

        if saved_state is not None:
            if "prev_key" in saved_state:
                prev_k = saved_state["prev_key"]
                prev_v = saved_state["prev_value"]
                kv_bsz = prev_k.size(0)
                prev_k = prev_k.view(kv_bsz * self.num_heads, -1, self.head_dim)
                prev_v = prev_v.view(kv_bsz * self.num_heads, -1, self.head_dim)
                if static_kv:
                    k, v = prev_k, prev_v
                else:
                    k, v = torch.cat([prev_k, k], dim=1), torch.cat([prev_v, v], dim=1)
            kv_bsz = k.size(0) // self.num_heads
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved_state.get("prev_key_padding_mask"),
                batch_size=kv_bsz,
                src_len=k.size(1),
                static_kv=static_kv,
            )
            saved_state["prev_key"] = k.view(kv_bsz, self.num_heads, -1, self.head_dim)
            saved_state["prev_value"] = v.view(kv_bsz, self.num_heads, -1, self.head_dim)
            saved_state["prev_key_padding_mask"] = key_padding_mask
            incremental_state = self._set_input_buffer(incremental_state, saved_state)

        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None
        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_zero_attn(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask
            )
        src_len = k.size(1)

        attn_weights = self._dsq_bmm(q, k.transpose(1, 2), "qk")
        attn_weights = self.apply_sparse_mask(attn_weights, tgt_len, src_len, bsz)
        if attn_mask is not None:
            attn_weights = attn_weights + attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            attn_weights = (
                attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
                .masked_fill(key_padding_mask.view(bsz, 1, 1, src_len).to(torch.bool),
                             float("-inf"))
                .view(bsz * self.num_heads, tgt_len, src_len)
            )
        if before_softmax:
            return attn_weights, v

        attn_weights_float = utils.softmax(attn_weights, dim=-1)
        attn_probs = self.dropout_module(attn_weights_float.type_as(attn_weights))
        attn = self._dsq_bmm(attn_probs, v, "pv")
        attn = self.out_proj(attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim))

        weights: Optional[Tensor] = None
        if need_weights:
            weights = attn_weights_float.view(bsz, self.num_heads, tgt_len, src_len).transpose(1, 0)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return attn, weights


def install_dsq(
    model: nn.Module, runtime: DSQRuntime, quantize_attention_matmul: bool = True
) -> int:
    """Turn every ``nn.Linear`` and ``MultiheadAttention`` of ``model`` into its DSQ version.

    Also swaps every ``FairseqDropout`` for :class:`DSQDropout`, every ``activation_fn`` that
    is ``F.relu`` for :class:`DSQReLU` (1-bit masks) and every ``nn.LayerNorm`` for
    :class:`~dsq_fairseq.nn.layernorm.DSQLayerNorm` (``--dsq-layernorm-stash-bits``); these are
    not counted.
    Returns the number of modules converted. Idempotent (re-installing only rebinds the runtime).
    """
    converted = 0
    for module in model.modules():
        if isinstance(module, FairseqDropout):
            module.__class__ = DSQDropout
            module.dsq_runtime = runtime
        elif isinstance(module, nn.LayerNorm):
            module.__class__ = DSQLayerNorm
            module.dsq_runtime = runtime
        activation = getattr(module, "activation_fn", None)
        if activation is F.relu or isinstance(activation, DSQReLU):
            module.activation_fn = DSQReLU(runtime)
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            if module.use_xformers:
                raise ValueError(f"{name}: xformers attention is not supported by DSQ")
            module.__class__ = DSQMultiheadAttention
            module.dsq_quantize_matmul = quantize_attention_matmul
        elif isinstance(module, nn.Linear):
            module.__class__ = DSQLinear
        else:
            continue
        module.dsq_runtime = runtime
        module.dsq_name = name
        converted += 1
    return converted
