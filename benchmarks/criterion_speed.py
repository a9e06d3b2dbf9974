"""The label-smoothed loss's backward over ``[tokens, vocab]`` logits, fairseq's way vs the
plugin's, in one run (JSON out).

* ``fairseq_autograd``: what ``label_smoothed_cross_entropy`` does in backward, and what
  ``dsq_label_smoothed_cross_entropy`` did before it wrote the gradient itself: autograd through
  fairseq's ``log_softmax`` + ``label_smoothed_nll_loss`` (log-probs, the gather's zero-filled
  gradient, the sum of the two branch gradients, the log-softmax gradient);
* ``dsq_direct``: :func:`~dsq_fairseq.criterions.dsq_label_smoothed_cross_entropy.
  label_smoothed_logits_grad`, the same bits with the log-softmax in place and one more tensor.

Both start from a fresh copy of the logits (standing in for the recomputed vocabulary GEMM); the
two are interleaved over ``--repeats`` rounds (this machine is noisy), medians reported, and
``time_vs_fairseq`` is the ratio of medians. The two results are checked bit-identical.

    python benchmarks/criterion_speed.py [--tokens 4096] [--vocab 2400] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Callable, Dict, List

import torch

from dsq_fairseq.criterions.dsq_label_smoothed_cross_entropy import label_smoothed_logits_grad

logging.getLogger().setLevel(logging.WARNING)  # fairseq's model imports log at DEBUG


def cases(tokens: int, vocab: int, epsilon: float = 0.1, pad: int = 1
          ) -> Dict[str, Callable[[], torch.Tensor]]:
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from fairseq.utils import log_softmax

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen) * 4
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[-tokens // 20:] = pad  # some padding, as in a batch
    grad_loss = torch.tensor(1.0)

    def fairseq_autograd() -> torch.Tensor:
        x = logits.clone().requires_grad_(True)
        loss, _ = label_smoothed_nll_loss(log_softmax(x, dim=-1), target, epsilon,
                                          ignore_index=pad, reduce=True)
        return torch.autograd.grad(loss, x, grad_loss)[0]

    def dsq_direct() -> torch.Tensor:
        return label_smoothed_logits_grad(logits.clone(), target, epsilon, pad, grad_loss)

    return {"fairseq_autograd": fairseq_autograd, "dsq_direct": dsq_direct}


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    variants = cases(args.tokens, args.vocab)
    results = {name: f() for name, f in variants.items()}  # warm-up, and the bit check
    identical = torch.equal(*(r.view(torch.int32) for r in results.values()))
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, f in variants.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    report = {
        "benchmark": "criterion_speed",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "bit_identical": identical,
        "ms_median": {name: round(t * 1e3, 2) for name, t in median.items()},
        "time_vs_fairseq": round(median["dsq_direct"] / median["fairseq_autograd"], 3),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
