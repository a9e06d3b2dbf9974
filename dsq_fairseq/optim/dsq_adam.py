"""``dsq_adam``: fairseq's Adam with its two moments stored quantized (Chitsaz et al.'s recipe
quantizes weights, activations, gradients *and* optimizer states).

Per parameter the optimizer state holds, instead of two fp32 tensors (8 bytes per element):

=====================  ===================================  =================================
key                    dtype / shape                        meaning
=====================  ===================================  =================================
``step``               int                                  updates taken
``exp_avg_codes``      int8 ``[numel]``                     first moment ``m``, signed codes
``exp_avg_sq_codes``   uint8 ``[numel]``                    ``sqrt(v)``, unsigned codes
``*_scale``            fp32 ``[ceil(numel / B)]``           format ``int``: scale per block
``*_exp``              int8 ``[ceil(numel / B)]`` (``[1]``)  ``bfp`` (``fixed``): exponents
``qbits``, ``qblock``  int                                  the layout the codes were stored in
=====================  ===================================  =================================

(formulas in :mod:`dsq_fairseq.optim.state_quant`). Each step dequantizes both moments to fp32,
takes exactly fairseq's Adam step (decoupled weight decay, as ``--optimizer adam``) and
requantizes them; nothing fp32 survives between steps, so a run resumed from a checkpoint (which
holds the codes) continues bit-identically. Format ``none`` keeps fp32 ``exp_avg`` /
``exp_avg_sq`` and is bit-identical to fairseq's ``adam``.

A checkpoint written with one layout resumes under another (e.g. other ``--dsq-adam-state-bits``):
the codes are decoded with the stored ``qbits`` / ``qblock`` and re-encoded with the new ones.
"""

import ast
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from dsq_fairseq.optim.state_quant import (
    STATE_FORMATS,
    StateQuantizer,
    fp32_adam_bytes,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed); exp_avg_sq as sqrt(v)


@dataclass
class DSQAdamConfig(FairseqDataclass):
    """fairseq's Adam options (same names as ``--optimizer adam``) plus the state format."""

    adam_betas: Any = field(
        default=(0.9, 0.999), metadata={"help": "betas for Adam optimizer"}
    )
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for Adam optimizer"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    dsq_adam_state_format: ChoiceEnum(STATE_FORMATS) = field(  # type: ignore[valid-type]
        default="int",
        metadata={
            "help": "storage of Adam's moments: int (linear codes, fp32 absmax scale per block), "
            "bfp (codes + int8 shared exponent per block), fixed (one exponent per tensor), "
            "none (fp32, = fairseq's adam)"
        },
    )
    dsq_adam_state_bits: int = field(
        default=8,
        metadata={"help": "bits per moment code, 2..8 (the second moment is stored as an "
                  "unsigned sqrt(v))"},
    )
    dsq_adam_block_size: int = field(
        default=128,
        metadata={"help": "elements per scale block along the flattened parameter (int, bfp)"},
    )
    lr: List[float] = II("optimization.lr")


@register_optimizer("dsq_adam", dataclass=DSQAdamConfig)
class FairseqDSQAdam(FairseqOptimizer):
    """fairseq optimizer wrapper of :class:`QuantizedStateAdam` (``--optimizer dsq_adam``)."""

    def __init__(self, cfg: DSQAdamConfig, params):
        super().__init__(cfg)
        quantizer = StateQuantizer(
            format=str(getattr(cfg.dsq_adam_state_format, "value", cfg.dsq_adam_state_format)),
            bits=cfg.dsq_adam_state_bits,
            block_size=cfg.dsq_adam_block_size,
        )
        self._optimizer = QuantizedStateAdam(params, quantizer=quantizer, **self.optimizer_config)

    @property
    def optimizer_config(self):
        """Overrides for the param groups, also applied to a loaded checkpoint (as ``adam``)."""
        betas = self.cfg.adam_betas
        if isinstance(betas, str):  # '(0.9,0.98)' from the command line
            betas = ast.literal_eval(betas)
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        return {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": tuple(betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (the quantized moments and scales)."""
        return self._optimizer.state_bytes()


class QuantizedStateAdam(torch.optim.Optimizer):
    """Adam (fairseq's variant: decoupled weight decay, like AdamW) with quantized moments.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as :class:`fairseq.optim.adam.Adam`.
        quantizer: how ``m`` and ``sqrt(v)`` are stored between steps (default: int8, blocks
            of 128).
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        quantizer: Optional[StateQuantizer] = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.quantizer = quantizer if quantizer is not None else StateQuantizer()
        self._reported = False

    @property
    def supports_memory_efficient_fp16(self):
        return True

    @property
    def supports_flat_params(self):
        return True

    # ------------------------------------------------------------------ state (de)quantization

    def _load_moments(self, state, like: torch.Tensor):
        """fp32 ``(m, v)`` of ``like``'s shape from whatever layout ``state`` holds."""
        if "exp_avg" in state:  # fp32 moments (format none, or a checkpoint of it)
            return state["exp_avg"].to(like), state["exp_avg_sq"].to(like)
        bits, block = state["qbits"], state["qblock"]
        out = []
        for name, signed in _MOMENTS:
            x = StateQuantizer.decode(
                state[f"{name}_codes"], bits, block, signed,
                scale=state.get(f"{name}_scale"), exp=state.get(f"{name}_exp"),
            ).view_as(like)
            out.append(x if signed else x * x)  # v = sqrt(v)^2
        return out[0], out[1]

    def _store_moments(self, state, m: torch.Tensor, v: torch.Tensor) -> None:
        q = self.quantizer
        for key in [k for k in state if k != "step"]:
            del state[key]
        if not q.enabled:
            state["exp_avg"], state["exp_avg_sq"] = m, v
            return
        state["qbits"], state["qblock"] = q.bits, q.block_for(m.numel())
        for (name, signed), x in zip(_MOMENTS, (m, v.sqrt())):
            for part, tensor in q.encode(x, signed).items():
                state[f"{name}_{part}"] = tensor

    def state_bytes(self) -> int:
        """Sum of ``nbytes`` of every tensor in ``self.state``."""
        return tensor_bytes({id(p): s for p, s in self.state.items()})

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step per parameter: dequantize, update exactly as fairseq's Adam, requantize."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                if grad.dtype in {torch.float16, torch.bfloat16}:
                    grad = grad.float()
                if grad.is_sparse:
                    raise RuntimeError("dsq_adam does not support sparse gradients")

                p_data_fp32 = p.data
                if p.data.dtype in {torch.float16, torch.bfloat16}:
                    p_data_fp32 = p_data_fp32.float()

                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    exp_avg = torch.zeros_like(p_data_fp32)
                    exp_avg_sq = torch.zeros_like(p_data_fp32)
                else:
                    exp_avg, exp_avg_sq = self._load_moments(state, p_data_fp32)
                beta1, beta2 = group["betas"]

                state["step"] += 1

                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])

                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1

                if group["weight_decay"] != 0:
                    p_data_fp32.add_(p_data_fp32, alpha=-group["weight_decay"] * group["lr"])

                p_data_fp32.addcdiv_(exp_avg, denom, value=-step_size)

                if p.data.dtype in {torch.float16, torch.bfloat16}:
                    p.data.copy_(p_data_fp32)

                self._store_moments(state, exp_avg, exp_avg_sq)

        if not self._reported and self.state:
            self._reported = True
            numel = sum(p.numel() for p in self.state)
            logger.info(
                "dsq_adam: moments stored as %s: optimizer state %d bytes for %d parameters "
                "(fp32 adam: %d bytes)", self.quantizer, self.state_bytes(), numel,
                fp32_adam_bytes(numel),
            )
        return loss

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict):
        """torch's loading, then the codes get their integer dtypes back.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to the parameter's
        (floating) dtype; the codes and exponents are cast back to the dtype they were saved
        with (exact: they are small integers), so memory and values are as before the save.
        """
        saved_groups = state_dict["param_groups"]
        dtypes = {
            pid: {k: v.dtype for k, v in s.items() if isinstance(v, torch.Tensor)}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        for pid, p in zip(saved_ids, params):
            state = self.state.get(p)
            for key, dtype in dtypes.get(pid, {}).items():
                if state is not None and state[key].dtype != dtype:
                    state[key] = state[key].to(dtype)
