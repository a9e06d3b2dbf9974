"""Static cost analysis of a DSQ architecture: ``python -m dsq_fairseq.cost``.

    python -m dsq_fairseq.cost --arch dsq_transformer_iwslt_de_en --format bfp \\
        --precision 16,4,4,16 --tokens 4096 --src-len 30 --tgt-len 30 [--json]
    python -m dsq_fairseq.cost --precision "2,2,2,16;16,4,4,16" --steps-per-level 3000,9000

The model is built by fairseq's own parser (``--user-dir dsq_fairseq``, task
``dsq_translation``, a dummy dictionary of ``--vocab-size`` symbols) and run once, forward and
backward, on a dummy batch of ``tokens // max(src_len, tgt_len)`` pad-free sentence pairs with
an observer on its DSQ runtime, so every GEMM shape comes from the GEMMs that ran. By default
the pass runs on PyTorch's ``meta`` device (shapes only, no arithmetic: seconds for any size);
``--device cpu`` runs it for real. Every GEMM is then costed (:mod:`dsq_fairseq.cost.model`) at
each requested level and compared with the same shapes at Fixed(32) and Fixed(16); several
levels are integrated over ``--steps-per-level``. Unknown options go to fairseq's parser
(e.g. ``--encoder-layers 1``, ``--share-all-embeddings``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dsq_fairseq.cost.model import FIXED16, FIXED32, Comparison, gemm_cost
from dsq_fairseq.precision import (
    FORMATS,
    INT_GRANULARITIES,
    DSQConfigError,
    Precision,
    QuantScheme,
)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = Precision(32, 32, 32, 32)


def parse_levels(text: str) -> List[Precision]:
    """``"16,4,4,16"`` or ``"2,2,2,16;16,4,4,16"`` (any order; levels need not rise)."""
    parts = [p for p in str(text).strip().strip(";").split(";") if p.strip()]
    if not parts:
        raise DSQConfigError("--precision: give one or more levels like '16,4,4,16'")
    return [Precision.parse(p, "--precision") for p in parts]


def parse_steps(text: Optional[str], levels: int) -> List[int]:
    if text is None:
        return [1] * levels
    try:
        steps = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise DSQConfigError(f"--steps-per-level: '{text}' is not a list of integers") from None
    if len(steps) == 1:
        steps = steps * levels
    if len(steps) != levels or any(s < 0 for s in steps) or sum(steps) == 0:
        raise DSQConfigError(
            f"--steps-per-level: need one non-negative count per level ({levels}), not all zero; "
            f"got '{text}'"
        )
    return steps


@contextlib.contextmanager
def _meta_bools_false() -> Iterator[None]:
    """On ``meta`` tensors ``bool(t)`` has no value; fairseq asks only "is there padding?"
    (``mask.any()``), which is False for the pad-free dummy batch."""
    import torch

    original = torch.Tensor.__bool__

    def meta_bool(self):
        return False if self.is_meta else original(self)

    torch.Tensor.__bool__ = meta_bool  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.__bool__ = original  # type: ignore[assignment]


def build_model(arch: str, vocab_size: int, extra: Sequence[str]):
    """The real ``arch`` built through fairseq's parser with a dummy ``vocab_size`` dictionary."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if vocab_size < 5:
        raise DSQConfigError("--vocab-size: must be >= 5 (fairseq adds 4 special symbols)")
    with tempfile.TemporaryDirectory(prefix="dsq_cost_dict_") as data:
        for lang in ("src", "tgt"):
            with open(os.path.join(data, f"dict.{lang}.txt"), "w") as f:
                f.writelines(f"w{i} 1\n" for i in range(vocab_size - 4))
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(
            parser,
            [data, "--user-dir", PACKAGE_DIR, "--task", "dsq_translation", "--arch", arch,
             "--source-lang", "src", "--target-lang", "tgt", "--cpu", "--no-save",
             *extra,
             # shapes only: structure of a DSQ model, no quantization while tracing
             "--dsq-format", "bfp", "--dsq-schedule", "32,32,32,32"],
        )
        cfg = convert_namespace_to_omegaconf(args)
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
    return task, model


def trace_gemms(
    model, task, batch_size: int, src_len: int, tgt_len: int, training: bool = True,
    device: str = "meta",
) -> List[Any]:
    """Run one forward (+ backward when ``training``) pass; the GEMM records, in order."""
    import torch

    records: List[Any] = []
    model = model.to(device)
    model.train(training)
    symbol = task.source_dictionary.nspecial  # first ordinary symbol: never pad/eos
    src = torch.full((batch_size, src_len), symbol, dtype=torch.long, device=device)
    lengths = torch.full((batch_size,), src_len, dtype=torch.long, device=device)
    prev = torch.full((batch_size, tgt_len), symbol, dtype=torch.long, device=device)
    runtime = model.dsq_runtime
    runtime.observers.append(records.append)
    guard = _meta_bools_false() if device == "meta" else contextlib.nullcontext()
    grad = contextlib.nullcontext() if training else torch.no_grad()
    try:
        with guard, grad:
            out = model(src, lengths, prev)[0]
            if training:
                out.float().sum().backward()
    finally:
        runtime.observers.remove(records.append)
    return records


GroupKey = Tuple[str, str, int, int, int, int, bool]


def group_records(records: Sequence[Any]) -> OrderedDict[GroupKey, int]:
    """``{(name, kind, batch, m, k, n, training): calls}`` in first-seen order."""
    groups: OrderedDict[GroupKey, int] = OrderedDict()
    for r in records:
        key = (r.name, r.kind, r.batch, r.m, r.k, r.n, r.training)
        groups[key] = groups.get(key, 0) + 1
    return groups


def cost_level(
    groups: OrderedDict[GroupKey, int],
    scheme: QuantScheme,
    precision: Precision,
    fp32_matmul: bool = False,
) -> Tuple[Comparison, List[Dict[str, Any]]]:
    """One level: total :class:`Comparison` and the per-GEMM rows."""
    total: Optional[Comparison] = None
    rows = []
    for (name, kind, batch, m, k, n, training), calls in groups.items():
        p = FP32 if (fp32_matmul and kind == "matmul") else precision
        comp = Comparison(
            gemm_cost(kind, batch, m, k, n, training, p, scheme),
            gemm_cost(kind, batch, m, k, n, training, FIXED32[1], FIXED32[0]),
            gemm_cost(kind, batch, m, k, n, training, FIXED16[1], FIXED16[0]),
        ).scaled(calls)
        total = comp if total is None else total + comp
        row: Dict[str, Any] = {
            "name": name, "kind": kind, "batch": batch, "m": m, "k": k, "n": n,
            "training": training, "calls": calls, "precision": str(p),
            "forward_macs": batch * m * k * n * calls,
        }
        row.update(comp.cost.as_dict())
        row.update(comp.ratios())
        rows.append(row)
    if total is None:
        raise DSQConfigError("no DSQ GEMM ran: is --arch a dsq_transformer architecture?")
    return total, rows


def analyse(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` (the CLI's options), trace the model, cost every level: the result."""
    args, extra = build_parser().parse_known_args(argv)
    return analyse_args(args, extra)


def analyse_args(args: argparse.Namespace, extra: Sequence[str]) -> Dict[str, Any]:
    """:func:`analyse` on parsed options; ``extra`` goes to fairseq's parser."""
    levels = parse_levels(args.precision)
    for level in levels:
        names = [p for p in level.as_list() if isinstance(p, str)]
        widths = [p for p in level.as_list() if not isinstance(p, str) and p < FP32.q0]
        if names and args.format != "mx":
            raise DSQConfigError(
                f"--precision: {names[0]} is an MX format, which needs --format mx"
            )
        if widths and args.format == "mx":
            raise DSQConfigError(
                f"--precision: width {widths[0]} is not an MX format; with --format mx each "
                "point names one (e.g. 'mxfp8_e4m3,mxfp4,mxfp4,mxfp8_e5m2') or is fp32"
            )
    steps = parse_steps(args.steps_per_level, len(levels))
    scheme = QuantScheme(
        format=args.format, block_size=args.block_size, exponent_bits=args.exponent_bits,
        int_granularity=args.int_granularity,
    )
    for name, v in (("--tokens", args.tokens), ("--src-len", args.src_len),
                    ("--tgt-len", args.tgt_len)):
        if v < 1:
            raise DSQConfigError(f"{name}: must be >= 1, got {v}")
    batch_size = max(1, args.tokens // max(args.src_len, args.tgt_len))
    task, model = build_model(args.arch, args.vocab_size, extra)
    records = trace_gemms(
        model, task, batch_size, args.src_len, args.tgt_len, training=not args.inference,
        device=args.device,
    )
    groups = group_records(records)

    integrated: Optional[Comparison] = None
    level_out = []
    for precision, n_steps in zip(levels, steps):
        comp, rows = cost_level(groups, scheme, precision, args.skip_attention_matmul)
        integrated = comp.scaled(n_steps) if integrated is None else (
            integrated + comp.scaled(n_steps))
        entry: Dict[str, Any] = {"precision": str(precision), "steps": n_steps}
        entry.update(comp.ratios())
        entry["per_step"] = {
            "cost": comp.cost.as_dict(), "fixed32": comp.fixed32.as_dict(),
            "fixed16": comp.fixed16.as_dict(),
        }
        entry["gemms"] = rows
        level_out.append(entry)
    assert integrated is not None
    result: Dict[str, Any] = {
        "arch": args.arch,
        "format": scheme.format,
        "scheme": {"block_size": scheme.block_size, "exponent_bits": scheme.exponent_bits,
                   "int_granularity": scheme.int_granularity},
        "skip_attention_matmul": bool(args.skip_attention_matmul),
        "mode": "inference" if args.inference else "training",
        "batch": {"sentences": batch_size, "src_len": args.src_len, "tgt_len": args.tgt_len,
                  "src_tokens": batch_size * args.src_len,
                  "tgt_tokens": batch_size * args.tgt_len, "vocab_size": args.vocab_size},
        "extra_fairseq_args": list(extra),
        "gemm_calls_per_step": len(records),
        "steps": sum(steps),
    }
    result.update(integrated.ratios())
    result["totals"] = {
        "cost": integrated.cost.as_dict(), "fixed32": integrated.fixed32.as_dict(),
        "fixed16": integrated.fixed16.as_dict(),
    }
    result["levels"] = level_out
    return result


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_text(result: Dict[str, Any], per_gemm: bool = True) -> str:
    b = result["batch"]
    lines = [
        f"{result['arch']}  format={result['format']}  "
        f"(BFP B={result['scheme']['block_size']}, e={result['scheme']['exponent_bits']}; "
        f"int granularity {result['scheme']['int_granularity']})  mode={result['mode']}",
        f"dummy batch: {b['sentences']} sentences x src {b['src_len']} / tgt {b['tgt_len']} "
        f"tokens ({b['src_tokens']} / {b['tgt_tokens']}), vocab {b['vocab_size']}; "
        f"{result['gemm_calls_per_step']} DSQ GEMM calls per step",
        "arith = Fixed32-MAC equivalents (w_a*w_b/32^2 per MAC + BFP/Int overheads); "
        "DRAM = bits read + written; ratios vs the same shapes at Fixed32 / Fixed16",
    ]
    for lv in result["levels"]:
        lines.append("")
        lines.append(f"level [{lv['precision']}]  x {lv['steps']} step(s)")
        if per_gemm:
            lines.append(
                f"  {'GEMM':<42} {'kind':<6} {'batch x m x k x n':>22} {'MACs/step':>10} "
                f"{'arith':>9} {'DRAM rd':>9} {'DRAM wr':>9} {'ar/F32':>7} {'dr/F32':>7}"
            )
            for g in lv["gemms"]:
                shape = f"{g['batch']}x{g['m']}x{g['k']}x{g['n']}"
                lines.append(
                    f"  {g['name'][:42]:<42} {g['kind']:<6} {shape:>22} {_si(g['macs']):>10} "
                    f"{_si(g['arith']):>9} {_si(g['dram_read']):>9} {_si(g['dram_write']):>9} "
                    f"{g['arith_vs_fixed32']:>7.4f} {g['dram_vs_fixed32']:>7.4f}"
                )
        c, f32, f16 = (lv["per_step"][k] for k in ("cost", "fixed32", "fixed16"))
        lines.append(
            f"  per step: MACs {_si(c['macs'])}, arith {_si(c['arith'])} "
            f"(Fixed32 {_si(f32['arith'])}, Fixed16 {_si(f16['arith'])}), DRAM {_si(c['dram'])}b "
            f"(Fixed32 {_si(f32['dram'])}b, Fixed16 {_si(f16['dram'])}b)"
        )
        lines.append(
            f"  arith {lv['arith_vs_fixed32']:.4f}x Fixed32, {lv['arith_vs_fixed16']:.4f}x "
            f"Fixed16 | DRAM {lv['dram_vs_fixed32']:.4f}x Fixed32, "
            f"{lv['dram_vs_fixed16']:.4f}x Fixed16"
        )
    lines.append("")
    lines.append(
        f"TOTAL over {result['steps']} step(s): arith {result['arith_vs_fixed32']:.4f}x Fixed32 "
        f"({1 / result['arith_vs_fixed16']:.2f}x fewer than Fixed16), DRAM "
        f"{result['dram_vs_fixed32']:.4f}x Fixed32 ({1 / result['dram_vs_fixed16']:.2f}x fewer "
        "than Fixed16)"
    )
    lines.append(
        f"  arith_vs_fixed32={result['arith_vs_fixed32']:.4f} "
        f"dram_vs_fixed32={result['dram_vs_fixed32']:.4f} "
        f"arith_vs_fixed16={result['arith_vs_fixed16']:.4f} "
        f"dram_vs_fixed16={result['dram_vs_fixed16']:.4f}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsq_fairseq.cost",
        description="Arithmetic and DRAM cost of a DSQ architecture relative to Fixed32/Fixed16 "
        "(docs/cost_model.md). Unknown options are passed to fairseq's parser.",
    )
    p.add_argument("--arch", default="dsq_transformer_iwslt_de_en",
                   help="a dsq_transformer architecture (default: %(default)s)")
    p.add_argument("--format", default="bfp", choices=FORMATS, help="number format")
    p.add_argument("--precision", default="16,4,4,16",
                   help="level 'q0,q1,q2,q3' or levels 'a;b;...' (widths 2..32, 32/fp32 = "
                   "unquantized; with --format mx, MX format names); default %(default)s")
    p.add_argument("--steps-per-level", default=None,
                   help="updates spent at each level, 'N' or 'N1,N2,...' (default: 1 each)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens per batch (--max-tokens); sentences = tokens // max(src, tgt)")
    p.add_argument("--src-len", type=int, default=30, help="source sentence length")
    p.add_argument("--tgt-len", type=int, default=30, help="target sentence length")
    p.add_argument("--vocab-size", type=int, default=10000,
                   help="dictionary size incl. fairseq's 4 specials (default %(default)s)")
    p.add_argument("--block-size", type=int, default=16, help="BFP block size")
    p.add_argument("--exponent-bits", type=int, default=8, help="BFP shared exponent bits")
    p.add_argument("--int-granularity", default="tensor", choices=INT_GRANULARITIES,
                   help="Int scale granularity")
    p.add_argument("--skip-attention-matmul", action="store_true",
                   help="cost attention's QK^T and PV at fp32 (as --dsq-skip-attention-matmul)")
    p.add_argument("--inference", action="store_true",
                   help="forward pass only (no stash, no backward GEMMs)")
    p.add_argument("--device", default="meta", choices=("meta", "cpu"),
                   help="where the tracing pass runs (meta: shapes only, instant)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--summary", action="store_true", help="no per-GEMM lines in the text output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    try:
        result = analyse_args(args, extra)
    except DSQConfigError as e:
        sys.stderr.write(f"dsq-fairseq: error: {e}\n")
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_text(result, per_gemm=not args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
