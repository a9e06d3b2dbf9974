"""Bandwidth of the quantizers vs ``torch.clone`` on the same machine, in one run (JSON out).

GB/s = (bytes of the input read + bytes of the output written) per call / median time per call;
``torch.clone`` of the same tensor moves the same bytes, so ``frac_of_clone`` is the fraction of
the achievable copy bandwidth a quantizer reaches. The packed stash (``bfp*_pack_dim0``: fp32 in,
``w``-bit codes out; ``bfp*_unpack_dim0``: the inverse) is reported on the same scale:
``frac_of_clone`` is the clone's time over its time (it moves fewer bytes than a clone).
Every quantizer runs in its reference (eager, :mod:`dsq_fairseq.quant`) and fast
(:mod:`dsq_fairseq.quant.fast`) form; all variants are interleaved over ``--repeats`` rounds
(this machine is noisy) and the median is reported.

    python benchmarks/quantize_speed.py [--shape 4096,4096] [--repeats 7] [--iters 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

from dsq_fairseq.quant import bfp_quantize, fast, fast_pack, fixed_quantize, int_quantize
from dsq_fairseq.quant.packing import PackedTensor, pack

# importing fairseq's models runs logging.basicConfig(level=DEBUG) (wav2vec2_classification):
# without this, every inductor cache lock is logged to stderr around the JSON
logging.getLogger().setLevel(logging.WARNING)


def _pack_cases(x: torch.Tensor, width: int) -> Dict[str, Dict[str, Callable]]:
    """The packed stash (BFP, nearest, blocks along dim 0 as a linear's ``Q1(x)``): quantize and
    pack (reference: ``pack(bfp_quantize(x))``), and unpack (reference: the table gather)."""
    packed = fast_pack.bfp_pack(x, width, dim=0)
    if packed is None:  # no compiler / not fp32: nothing to compare
        return {}
    slow = PackedTensor(*packed.tensors(), *packed.meta()[:5])
    return {
        f"bfp{width}_pack_dim0": {
            "eager": lambda x: pack(bfp_quantize(x, width, dim=0), "bfp", width, dim=0),
            "fast": lambda x: fast_pack.bfp_pack(x, width, dim=0),
        },
        f"bfp{width}_unpack_dim0": {
            "eager": lambda x: slow.unpack(),
            "fast": lambda x: packed.unpack(),
        },
    }


def _cases(width: int) -> Dict[str, Dict[str, Callable]]:
    return {
        f"bfp{width}_dim-1": {
            "eager": lambda x: bfp_quantize(x, width, dim=-1),
            "fast": lambda x: fast.bfp_quantize(x, width, dim=-1),
        },
        f"bfp{width}_dim0": {
            "eager": lambda x: bfp_quantize(x, width, dim=0),
            "fast": lambda x: fast.bfp_quantize(x, width, dim=0),
        },
        f"bfp{width}_dim-1_stochastic": {
            "eager": lambda x: bfp_quantize(x, width, rounding="stochastic"),
            "fast": lambda x: fast.bfp_quantize(x, width, rounding="stochastic"),
        },
        f"fixed{width}": {
            "eager": lambda x: fixed_quantize(x, width),
            "fast": lambda x: fast.fixed_quantize(x, width),
        },
        f"int{width}_tensor": {
            "eager": lambda x: int_quantize(x, width, "tensor"),
            "fast": lambda x: fast.int_quantize(x, width, "tensor"),
        },
        f"int{width}_token": {
            "eager": lambda x: int_quantize(x, width, "token"),
            "fast": lambda x: fast.int_quantize(x, width, "token"),
        },
    }


def _time(fn: Callable, x: torch.Tensor, iters: int) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096,4096")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x.to(device=args.device, dtype=getattr(torch, args.dtype))
    nbytes = 2 * x.numel() * x.element_size()
    variants: Dict[str, Callable] = {"clone": torch.clone}
    cases = _cases(args.width)
    if x.dtype == torch.float32 and args.width in fast_pack.FAST_PACK_WIDTHS:
        cases.update(_pack_cases(x, args.width))
    for case, impls in cases.items():
        for impl, fn in impls.items():
            variants[f"{case}/{impl}"] = fn
    warm: Dict[str, float] = {}
    for name, fn in variants.items():  # warm-up, incl. torch.compile (timed once)
        start = time.perf_counter()
        fn(x)
        warm[name] = time.perf_counter() - start
        fn(x)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(_time(fn, x, args.iters))
    clone_t = statistics.median(times["clone"])
    result = {
        "benchmark": "quantize_speed",
        "device": str(x.device),
        "dtype": args.dtype,
        "shape": list(shape),
        "width": args.width,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fast_enabled": fast.enabled(),
        "clone_GBps": round(nbytes / clone_t / 1e9, 2),
        "quantizers": {},
    }
    for name in variants:
        if name == "clone":
            continue
        t = statistics.median(times[name])
        result["quantizers"][name] = {
            "GBps": round(nbytes / t / 1e9, 2),
            "frac_of_clone": round(clone_t / t, 3),
            "ms": round(t * 1e3, 3),
            "first_call_s": round(warm[name], 2),
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
