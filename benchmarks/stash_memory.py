"""Bytes a training forward really retains for backward: FP32 fairseq vs DSQ fake-quant vs packed.

Builds fairseq's ``transformer_iwslt_de_en`` and ``dsq_transformer_iwslt_de_en`` (same
dimensions, a dummy ``--vocab-size`` dictionary) through fairseq's parser, runs one training
forward (dropout on) on the same random batch plus the label-smoothed loss, and measures what the
autograd graph holds: a walk from the loss over every node, summing the distinct storages of

* built-in nodes' saved tensors (every ``_saved_*`` attribute that is a tensor or a sequence of
  tensors),
* custom Functions' ``saved_tensors`` and every tensor kept as a ``ctx`` attribute.

Parameters held by nodes are reported apart (``params_held_bytes``): they exist with or without a
graph. ``whole_model_bytes`` is everything else. ``gemm_stash_bytes`` is what the GEMM nodes hold
(DSQ: the ``_DSQLinearFunction`` / ``_DSQMatmulFunction`` stashes, weight stashes included;
fairseq: ``addmm`` / ``mm`` / ``bmm`` / attention nodes, weights excluded as parameters).
DSQ rows split it into ``gemm_activation_stash_bytes`` and ``gemm_weight_stash_bytes`` (with
round-to-nearest, packed linears keep no weight copy: they recompute ``Q1(W)`` from the master
weight, a parameter). ``per_gemm`` compares each DSQ GEMM's activation stash fake-quant vs packed
(a shared stash counts for every GEMM that holds it).

Rows: ``fp32_fairseq`` and ``dsq_fake_quant`` (``--dsq-packed-stash off``) use fairseq's
``label_smoothed_cross_entropy`` code; ``dsq_packed`` is the plugin's packed training as the
scripts run it: ``--dsq-packed-stash on`` and the ``dsq_label_smoothed_cross_entropy`` criterion
(same values; its loss node keeps the packed ``Q0(x)`` of the output projection instead of the
``[tokens, vocab]`` log-probabilities); ``dsq_packed_fairseq_criterion``: packed, with fairseq's
criterion. ``step_time_s`` times forward + backward of each DSQ row, interleaved over
``--repeats`` rounds on the same model and batch (median and min; the first round is a warm-up),
with ratios to ``dsq_fake_quant``.

    python benchmarks/stash_memory.py [--schedule 16,4,4,16] [--format bfp] [--vocab-size 8000]
        [--batch-size 16] [--src-len 24] [--tgt-len 24] [--repeats 3] [--dims iwslt|demo]
        [--layernorm-stash-bits 16,8]

``dsq_packed_layernormB`` rows: packed, plus layer-norm inputs stashed at B bits (lossy, off by
default in training).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIMS = {
    "iwslt": [],  # transformer_iwslt_de_en as it is: 6+6 layers, 512 dims, FFN 1024, 4 heads
    "demo": ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "128",
             "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256",
             "--decoder-ffn-embed-dim", "256", "--encoder-attention-heads", "4",
             "--decoder-attention-heads", "4"],
}
GEMM_NODES = ("AddmmBackward", "MmBackward", "BmmBackward", "LinearBackward", "MatmulBackward",
              "ScaledDotProduct", "_DSQLinearFunctionBackward", "_DSQMatmulFunctionBackward")


def build(data: str, arch: str, task: str, extra: Sequence[str]):
    """A model built by fairseq's parser (``--task``, ``--arch``, extra options)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [data, "--user-dir", str(REPO / "dsq_fairseq"), "--task", task, "--arch", arch,
         "--source-lang", "src", "--target-lang", "tgt", "--cpu", "--no-save", "--seed", "1",
         "--dropout", "0.3", *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    t = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    return t, t.build_model(cfg.model)


def make_batch(task, batch_size: int, src_len: int, tgt_len: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    d = task.source_dictionary
    low, high = d.nspecial, len(d)
    src = torch.randint(low, high, (batch_size, src_len), generator=gen)
    tgt = torch.randint(low, high, (batch_size, tgt_len), generator=gen)
    prev = torch.cat([torch.full((batch_size, 1), d.eos()), tgt[:, :-1]], dim=1)
    return {"src_tokens": src, "src_lengths": torch.full((batch_size,), src_len),
            "prev_output_tokens": prev, "target": tgt}


def loss_of(model, batch, recompute_logits: bool = False) -> torch.Tensor:
    """fairseq's label-smoothed loss (eps 0.1); ``recompute_logits``: through the plugin's
    ``dsq_label_smoothed_cross_entropy`` path (same values; keeps no log-probabilities)."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    from dsq_fairseq.nn.logits import loss_recomputing_logits

    net_output = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])

    def fairseq_loss(logits):
        lprobs = model.get_normalized_probs((logits, *net_output[1:]), log_probs=True)
        return label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)), batch["target"].view(-1), 0.1, reduce=True
        )

    out = loss_recomputing_logits(net_output[0], fairseq_loss) if recompute_logits else None
    return (fairseq_loss(net_output[0]) if out is None else out)[0]


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def node_tensors(node) -> List[torch.Tensor]:
    """Every tensor ``node`` keeps for backward (saved tensors and ctx attributes)."""
    out: List[torch.Tensor] = []
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        out.extend(node.saved_tensors)
        for value in vars(node).values():
            out.extend(_tensors(value))
        return out
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                out.extend(_tensors(getattr(node, name)))
            except RuntimeError:  # already freed
                pass
    return out


def _storage(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _dsq_activation_stash(node, param_ptrs: set) -> Dict[int, int]:
    """Storages of a DSQ GEMM node's activation stashes (a linear's second stash is its
    weight's: left out)."""
    saved, out, i = node.saved_tensors, {}, 0
    for group, (n, _) in enumerate(node.stash_layout):
        if not (group == 1 and type(node).__name__.startswith("_DSQLinear")):
            for t in saved[i:i + n]:
                st = _storage(t)
                if st is not None and st[0] not in param_ptrs:
                    out[st[0]] = st[1]
        i += n
    return out


def walk(loss: torch.Tensor, param_ptrs: set) -> Dict[str, object]:
    """Distinct storages held by the graph of ``loss``, by kind of node."""
    seen, stack = set(), [loss.grad_fn]
    nodes = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    held: Dict[int, int] = {}
    gemm: Dict[int, int] = {}
    by_node: Dict[str, int] = {}
    params: Dict[int, int] = {}
    activation: Dict[int, int] = {}
    per_gemm = []
    for node in nodes:
        name = type(node).__name__
        own = {}
        for t in node_tensors(node):
            st = _storage(t)
            if st is None:
                continue
            if st[0] in param_ptrs:
                params[st[0]] = st[1]
                continue
            own[st[0]] = st[1]
        is_gemm = name.startswith(GEMM_NODES)
        for ptr, nbytes in own.items():
            if ptr not in held:
                key = name.rstrip("0123456789")
                by_node[key] = by_node.get(key, 0) + nbytes
            held[ptr] = nbytes
            if is_gemm:
                gemm[ptr] = nbytes
        if name.startswith("_DSQ"):
            act = _dsq_activation_stash(node, param_ptrs)
            activation.update(act)
            per_gemm.append((node._sequence_nr(), name, sum(act.values())))
    per_gemm.sort()
    return {
        "whole_model_bytes": sum(held.values()),
        "gemm_stash_bytes": sum(gemm.values()),
        "params_held_bytes": sum(params.values()),
        "gemm_activation_stash_bytes": sum(activation.values()),
        "gemm_weight_stash_bytes": sum(gemm.values()) - sum(activation.values()),
        "by_node": dict(sorted(by_node.items(), key=lambda kv: -kv[1])[:12]),
        "_per_gemm": [b for _, _, b in per_gemm],
    }


def measure(model, batch, recompute_logits: bool = False) -> Dict[str, object]:
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss = loss_of(model, batch, recompute_logits)
    result = walk(loss, params)
    del loss
    return result


STEP_MODES = {  # name: (--dsq-packed-stash, loss through dsq_label_smoothed_cross_entropy)
    "fake_quant": ("off", False),
    "packed": ("on", True),
    "packed_fairseq_criterion": ("on", False),
}


def step_time(model, batch, repeats: int) -> Dict[str, Tuple[float, float]]:
    """(median, min) seconds of forward + backward per :data:`STEP_MODES` entry, interleaved."""
    times: Dict[str, List[float]] = {m: [] for m in STEP_MODES}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, (packing, recompute) in STEP_MODES.items():
            model.dsq_runtime.stash_packing = packing
            model.zero_grad(set_to_none=True)
            torch.manual_seed(2)
            start = time.perf_counter()
            loss_of(model, batch, recompute).backward()
            times[mode].append(time.perf_counter() - start)
    return {m: (statistics.median(ts[1:]), min(ts[1:])) for m, ts in times.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", default="16,4,4,16")
    ap.add_argument("--format", default="bfp")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--src-len", type=int, default=24)
    ap.add_argument("--tgt-len", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (0: no timing)")
    ap.add_argument("--dims", choices=sorted(DIMS), default="iwslt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--layernorm-stash-bits", default="16,8",
                    help="comma list: also measure packed with --dsq-layernorm-stash-bits B "
                    "(lossy layer-norm stash; '' for none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = DIMS[args.dims]
    with tempfile.TemporaryDirectory(prefix="dsq_stash_dict_") as data:
        for lang in ("src", "tgt"):
            with open(os.path.join(data, f"dict.{lang}.txt"), "w") as f:
                f.writelines(f"w{i} 1\n" for i in range(args.vocab_size - 4))
        task, fp32 = build(data, "transformer_iwslt_de_en", "translation", dims)
        dsq_args = [*dims, "--dsq-format", args.format, "--dsq-schedule", args.schedule]
        _, dsq = build(data, "dsq_transformer_iwslt_de_en", "dsq_translation", dsq_args)
    batch = make_batch(task, args.batch_size, args.src_len, args.tgt_len)
    torch.manual_seed(3)
    rows = {"fp32_fairseq": measure(fp32, batch)}
    for name, (packing, recompute) in STEP_MODES.items():
        dsq.dsq_runtime.stash_packing = packing
        torch.manual_seed(3)
        rows[f"dsq_{name}"] = measure(dsq, batch, recompute)
    ln_bits = [int(b) for b in args.layernorm_stash_bits.split(",") if b.strip()]
    for b in ln_bits:
        dsq.dsq_runtime.layernorm_stash_bits = b
        torch.manual_seed(3)
        rows[f"dsq_packed_layernorm{b}"] = measure(dsq, batch, True)
    dsq.dsq_runtime.layernorm_stash_bits = 32
    fake, packed = rows["dsq_fake_quant"].pop("_per_gemm"), rows["dsq_packed"].pop("_per_gemm")
    for row in rows.values():
        row.pop("_per_gemm", None)
    for key in ("gemm_activation_stash_bytes", "gemm_weight_stash_bytes"):
        rows["fp32_fairseq"].pop(key)  # DSQ rows only
    per_gemm = [f / p for f, p in zip(fake, packed)]
    base, pk, fq = rows["fp32_fairseq"], rows["dsq_packed"], rows["dsq_fake_quant"]
    report: Dict[str, object] = {
        "config": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()},
        **rows,
        "per_gemm": {"count": len(per_gemm), "fake_over_packed_min": min(per_gemm),
                     "fake_over_packed_median": statistics.median(per_gemm),
                     "fake_over_packed_max": max(per_gemm)},
        "ratios": {
            "gemm_stash_fake_over_packed": fq["gemm_stash_bytes"] / pk["gemm_stash_bytes"],
            "gemm_activation_stash_fake_over_packed":
                fq["gemm_activation_stash_bytes"] / pk["gemm_activation_stash_bytes"],
            "gemm_stash_fp32_fairseq_over_packed":
                base["gemm_stash_bytes"] / pk["gemm_stash_bytes"],
            "whole_model_fp32_fairseq_over_packed":
                base["whole_model_bytes"] / pk["whole_model_bytes"],
            "whole_model_fp32_fairseq_over_fake_quant":
                base["whole_model_bytes"] / fq["whole_model_bytes"],
            "whole_model_fake_quant_over_packed":
                fq["whole_model_bytes"] / pk["whole_model_bytes"],
            "whole_model_fp32_fairseq_over_packed_fairseq_criterion": base["whole_model_bytes"]
                / rows["dsq_packed_fairseq_criterion"]["whole_model_bytes"],
            **{f"whole_model_fp32_fairseq_over_packed_layernorm{b}":
               base["whole_model_bytes"] / rows[f"dsq_packed_layernorm{b}"]["whole_model_bytes"]
               for b in ln_bits},
        },
    }
    if args.repeats:
        times = step_time(dsq, batch, args.repeats)
        report["step_time_s"] = {
            **{f"dsq_{m}_{stat}": t[i] for m, t in times.items()
               for i, stat in enumerate(("median", "min"))},
            **{f"{m}_over_fake_quant_{stat}": t[i] / times["fake_quant"][i]
               for m, t in times.items() if m != "fake_quant"
               for i, stat in enumerate(("median", "min"))},
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
