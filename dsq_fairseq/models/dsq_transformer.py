"""``dsq_transformer``: fairseq's transformer with every GEMM a DSQ GEMM.

The network is built by fairseq's own ``TransformerModel`` code (same modules, same
initialisation, same RNG order), then :func:`~dsq_fairseq.nn.modules.install_dsq` converts every
``nn.Linear`` (q/k/v/out projections of self- and cross-attention, both FFN layers, the output
projection) and every ``MultiheadAttention`` (its ``Q K^T`` and ``P V`` matmuls) in place. The
precision schedule is a submodule whose buffers carry the level through checkpoints.

``--dsq-format none`` installs nothing: the model is then fairseq's transformer, numerically
identical on the same seed (the schedule's buffers are the only addition).
"""


import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_wmt_en_de,
)

from dsq_fairseq.cost.accounting import CostLedger
from dsq_fairseq.errors import user_errors_exit_cleanly
from dsq_fairseq.nn.modules import DSQLinear, install_dsq
from dsq_fairseq.nn.runtime import (
    STASH_PACKING,
    DSQRuntime,
    check_layernorm_stash_bits,
    check_stash_packing,
)
from dsq_fairseq.precision import (
    FORMATS,
    INT_GRANULARITIES,
    ROUNDINGS,
    DSQConfigError,
    QuantScheme,
    parse_schedule,
)
from dsq_fairseq.schedule import PrecisionSchedule


@dataclass
class DSQConfig(FairseqDataclass):
    """The ``--dsq-*`` options of ``dsq_transformer`` (also valid as hydra ``model.dsq_*``)."""

    dsq_format: ChoiceEnum(FORMATS) = field(  # type: ignore[valid-type]
        default="bfp", metadata={"help": "number format of every GEMM operand"}
    )
    dsq_schedule: str = field(
        default="2,2,2,16;16,4,4,16",
        metadata={
            "help": "precision levels 'q0,q1,q2,q3;...' lowest first (widths 2..32, 32 or fp32 = "
            "unquantized; with --dsq-format mx each point names an MX format: mxint8, mxfp8_e4m3, "
            "mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, fp32); one level = static quantization"
        },
    )
    dsq_patience: int = field(
        default=5,
        metadata={"help": "validation rounds without improvement before the level rises"},
    )
    dsq_min_delta: float = field(
        default=0.0,
        metadata={"help": "an improvement of the validation loss must exceed this to count"},
    )
    dsq_block_size: int = field(
        default=16, metadata={"help": "BFP block size along the GEMM reduction dimension"}
    )
    dsq_exponent_bits: int = field(
        default=8, metadata={"help": "BFP shared-exponent bits (2..8)"}
    )
    dsq_rounding: ChoiceEnum(ROUNDINGS) = field(  # type: ignore[valid-type]
        default="nearest", metadata={"help": "round-half-to-even or stochastic rounding"}
    )
    dsq_int_granularity: ChoiceEnum(INT_GRANULARITIES) = field(  # type: ignore[valid-type]
        default="tensor",
        metadata={
            "help": "int format scales: tensor; channel (weights per output channel); token "
            "(weights per channel and activations/gradients per token)"
        },
    )
    dsq_skip_attention_matmul: bool = field(
        default=False,
        metadata={"help": "keep attention's Q K^T and P V matmuls in full precision"},
    )
    dsq_packed_stash: ChoiceEnum(STASH_PACKING) = field(  # type: ignore[valid-type]
        default="auto",
        metadata={
            "help": "keep what the GEMMs stash for backward (q1) bit-packed (w-bit codes + int8 "
            "exponents) and dropout/ReLU masks as 1 bit: auto (when q1 < 16), on (q1 <= 16), "
            "off (fake-quantized fp32 stash, for comparison)"
        },
    )
    dsq_layernorm_stash_bits: int = field(
        default=32,
        metadata={
            "help": "32: layer-norm inputs kept for backward in full precision; 2..16: kept "
            "quantized (--dsq-format at this width, packed) - lossy, the gradients change"
        },
    )


_DSQ_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DSQConfig)}


def _option(args: Any, name: str) -> Any:
    value = getattr(args, name, None)
    value = _DSQ_DEFAULTS[name] if value is None else value
    return getattr(value, "value", value)  # ChoiceEnum members -> str


def scheme_from_args(args: Any) -> QuantScheme:
    """The :class:`QuantScheme` of a namespace / DictConfig holding ``dsq_*`` options."""
    return QuantScheme(
        format=str(_option(args, "dsq_format")),
        block_size=_option(args, "dsq_block_size"),
        exponent_bits=_option(args, "dsq_exponent_bits"),
        rounding=str(_option(args, "dsq_rounding")),
        int_granularity=str(_option(args, "dsq_int_granularity")),
    )


def stash_packing_from_args(args: Any) -> str:
    """``--dsq-packed-stash`` of a namespace / DictConfig (validated: one of auto/on/off)."""
    return check_stash_packing(str(_option(args, "dsq_packed_stash")))


def schedule_from_args(args: Any) -> PrecisionSchedule:
    """The :class:`PrecisionSchedule` of a namespace / DictConfig (validated)."""
    patience = _option(args, "dsq_patience")
    try:
        min_delta = float(_option(args, "dsq_min_delta"))
    except (TypeError, ValueError):
        raise DSQConfigError(
            f"--dsq-min-delta: {_option(args, 'dsq_min_delta')!r} is not a number"
        ) from None
    levels = parse_schedule(
        str(_option(args, "dsq_schedule")), format=str(_option(args, "dsq_format"))
    )
    return PrecisionSchedule(levels, patience=patience, min_delta=min_delta)


@register_model("dsq_transformer")
class DSQTransformerModel(TransformerModel):
    """fairseq ``transformer`` whose GEMMs run through DSQ quantization points q0..q3.

    Attributes added to the fairseq model: ``dsq_schedule`` (a :class:`PrecisionSchedule`
    submodule, checkpointed), ``dsq_runtime`` (the :class:`DSQRuntime` shared by its GEMMs) and
    ``dsq_cost`` (a :class:`~dsq_fairseq.cost.accounting.CostLedger` submodule, checkpointed).
    """

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, DSQConfig())

    @classmethod
    def build_model(cls, args, task):
        # Validate every --dsq-* option before fairseq builds (or trains) anything.
        with user_errors_exit_cleanly():
            scheme = scheme_from_args(args)
            schedule = schedule_from_args(args)
            stash_packing = stash_packing_from_args(args)
            layernorm_bits = _option(args, "dsq_layernorm_stash_bits")
            check_layernorm_stash_bits(layernorm_bits, scheme)
        model = super().build_model(args, task)
        # one stochastic-rounding stream per rank, reproducible from --seed
        seed = int(getattr(args, "seed", 1) or 1) + _distributed_rank()
        model.attach_dsq(
            scheme, schedule, seed=seed,
            quantize_attention_matmul=not bool(_option(args, "dsq_skip_attention_matmul")),
            stash_packing=stash_packing, layernorm_stash_bits=layernorm_bits,
        )
        return model

    def attach_dsq(
        self,
        scheme: QuantScheme,
        schedule: PrecisionSchedule,
        seed: int = 1,
        quantize_attention_matmul: bool = True,
        stash_packing: str = "auto",
        layernorm_stash_bits: int = 32,
    ) -> None:
        """Install the schedule and (unless format ``none``) the DSQ GEMMs, dropouts, ReLUs and
        layer norms (``--dsq-packed-stash``, ``--dsq-layernorm-stash-bits``: see
        :class:`~dsq_fairseq.nn.runtime.DSQRuntime`)."""
        self.dsq_runtime = DSQRuntime(
            scheme, schedule.precision, seed=seed, stash_packing=stash_packing,
            layernorm_stash_bits=layernorm_stash_bits,
        )
        schedule._on_change = self._set_precision
        self.dsq_schedule = schedule
        # cumulative training cost per level (filled by the dsq_translation task), checkpointed
        self.dsq_cost = CostLedger(len(schedule.levels))
        self.dsq_gemm_modules = 0
        if scheme.enabled:
            self.dsq_gemm_modules = install_dsq(self, self.dsq_runtime, quantize_attention_matmul)
            projection = getattr(self.decoder, "output_projection", None)
            if isinstance(projection, DSQLinear):
                projection.dsq_keep_q0_input = True

    def _set_precision(self, precision) -> None:
        self.dsq_runtime.precision = precision


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _dsq_defaults(args: Any) -> None:
    for name, default in _DSQ_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


@register_model_architecture("dsq_transformer", "dsq_transformer")
def dsq_base_architecture(args):
    _dsq_defaults(args)
    base_architecture(args)


@register_model_architecture("dsq_transformer", "dsq_transformer_iwslt_de_en")
def dsq_transformer_iwslt_de_en(args):
    _dsq_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("dsq_transformer", "dsq_transformer_wmt_en_de")
def dsq_transformer_wmt_en_de(args):
    _dsq_defaults(args)
    transformer_wmt_en_de(args)


@register_model_architecture("dsq_transformer", "dsq_transformer_vaswani_wmt_en_de_big")
def dsq_transformer_vaswani_wmt_en_de_big(args):
    _dsq_defaults(args)
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("dsq_transformer", "dsq_transformer_demo")
def dsq_transformer_demo(args):
    """A 2+2-layer, 128-dim transformer for the built-in CPU demo corpus."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 256)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 128)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    _dsq_defaults(args)
    base_architecture(args)
