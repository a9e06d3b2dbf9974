"""Training throughput of ``fairseq-train``: FP32 fairseq transformer vs DSQ, in one run.

Every configuration trains the same architecture dimensions on the same data with the same seed
for ``--updates`` updates; configurations are interleaved over ``--repeats`` rounds (this machine
is noisy) and the JSON reports each one's median tokens/s (fairseq's ``wps`` over the run) and
its ratio to the FP32 baseline measured in the same rounds; ``steady_*`` use fairseq's per-window
``wps`` (``--log-interval`` = updates/3) without the first window, i.e. without start-up costs
such as compiling the fast quantizers (which a first, unmeasured ``--warmup-updates`` run of each
configuration also moves to the on-disk compile cache). ``DSQ_FAST=0`` in the environment measures
the eager reference quantizers instead.

    python benchmarks/train_speed.py [--data-bin DIR] [--updates 12] [--repeats 3]
        [--arch-dims iwslt|demo] [--heap reuse|default] [--configs a,b,...]

Without ``--data-bin`` the built-in toy corpus is generated and preprocessed into a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from dsq_fairseq import heap

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

DIMS = {
    # the demo architecture's dimensions (dsq_transformer_demo)
    "demo": ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "128",
             "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256",
             "--decoder-ffn-embed-dim", "256", "--encoder-attention-heads", "4",
             "--decoder-attention-heads", "4", "--share-all-embeddings"],
    # fairseq's transformer_iwslt_de_en as it is
    "iwslt": ["--share-all-embeddings"],
}

CONFIGS = {
    "fp32_fairseq": ["--arch", "transformer_iwslt_de_en", "--task", "translation"],
    "dsq_none": ["--arch", "dsq_transformer_iwslt_de_en", "--task", "dsq_translation",
                 "--dsq-format", "none"],
    "dsq_bfp_16_4_4_16": ["--arch", "dsq_transformer_iwslt_de_en", "--task", "dsq_translation",
                          "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16"],
    "dsq_bfp_2_2_2_16": ["--arch", "dsq_transformer_iwslt_de_en", "--task", "dsq_translation",
                         "--dsq-format", "bfp", "--dsq-schedule", "2,2,2,16"],
    # diagnostics (not in the default set): fairseq's own criterion (the FP32 run's; without
    # the plugin's logits recompute, which trades one more vocabulary GEMM for the memory of the
    # [tokens, vocab] log-probs), eager reference quantizers, fp32 (unpacked) stash
    "dsq_bfp_16_4_4_16_fairseq_loss": ["--arch", "dsq_transformer_iwslt_de_en", "--task",
                                       "dsq_translation", "--dsq-format", "bfp", "--dsq-schedule",
                                       "16,4,4,16", "CRITERION=label_smoothed_cross_entropy"],
    "dsq_bfp_16_4_4_16_eager": ["DSQ_FAST=0", "--arch", "dsq_transformer_iwslt_de_en", "--task",
                                "dsq_translation", "--dsq-format", "bfp", "--dsq-schedule",
                                "16,4,4,16"],
    "dsq_bfp_16_4_4_16_unpacked": ["--arch", "dsq_transformer_iwslt_de_en", "--task",
                                   "dsq_translation", "--dsq-format", "bfp", "--dsq-schedule",
                                   "16,4,4,16", "--dsq-packed-stash", "off"],
}
DEFAULT_CONFIGS = ("fp32_fairseq", "dsq_none", "dsq_bfp_16_4_4_16", "dsq_bfp_2_2_2_16")


def toy_data_bin(root: Path) -> Path:
    from dsq_fairseq.data.toy_corpus import write_corpus

    write_corpus(str(root / "raw"), 4000, 200, 200, seed=1)
    subprocess.run(
        [str(BIN / "fairseq-preprocess"), "--source-lang", "de", "--target-lang", "en",
         "--trainpref", str(root / "raw/train"), "--validpref", str(root / "raw/valid"),
         "--destdir", str(root / "bin"), "--joined-dictionary", "--workers", "1"],
        check=True, capture_output=True,
    )
    return root / "bin"


def train_once(data_bin: Path, work: Path, config: List[str], dims: List[str], updates: int,
               heap_reuse: bool = True) -> Dict[str, float]:
    env = dict(os.environ)
    if heap_reuse:  # every configuration, the FP32 baseline included: the same allocator
        env.update(heap.ENVIRONMENT)
    else:  # glibc's defaults for everyone: the DSQ task must not set its own either
        config = [*config, "--dsq-no-heap-reuse"] if "dsq_translation" in config \
            else config
    settings = dict(c.split("=", 1) for c in config if "=" in c and not c.startswith("-"))
    config = [c for c in config if not ("=" in c and not c.startswith("-"))]
    # as the scripts train: DSQ with the plugin's criterion (fairseq's numbers, recomputes the
    # vocabulary GEMM in backward instead of keeping [tokens, vocab] log-probs), unless the
    # configuration names one (CRITERION=...); the other NAME=VALUE items go to the environment
    criterion = settings.pop("CRITERION", None) or (
        "dsq_label_smoothed_cross_entropy" if "dsq_translation" in config
        else "label_smoothed_cross_entropy")
    env.update(settings)
    cmd = [
        str(BIN / "fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
        *config, *dims, "--optimizer", "adam", "--lr", "5e-4", "--criterion",
        criterion, "--label-smoothing", "0.1", "--dropout", "0.3",
        "--max-tokens", "4096", "--max-update", str(updates), "--seed", "1", "--cpu",
        "--no-save", "--disable-validation", "--log-format", "simple",
        "--log-interval", str(max(1, updates // 3)), "--save-dir", str(work),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(work), env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-train failed:\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    wps = [float(x) for x in re.findall(r"\bwps[= ]([0-9.]+)", log)]
    words = [float(x) for x in re.findall(r"\bwpb[= ]([0-9.]+)", log)]
    # train_inner windows (``wps=``, one per --log-interval); the first holds start-up work
    # (first-call compiles, allocator warm-up), the later ones are the steady state
    inner = [float(x) for x in re.findall(r"\bwps=([0-9.]+)", log)]
    steady = statistics.median(inner[1:]) if len(inner) > 1 else wps[-1]
    return {"wps": wps[-1], "wps_steady": steady, "wpb": words[-1], "wall_s": wall}


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-bin", type=Path)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch-dims", choices=sorted(DIMS), default="iwslt")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--warmup-updates", type=int, default=3,
                        help="one unmeasured run of each configuration first (fills the "
                             "torch.compile caches of the fast quantizers); 0 = none")
    parser.add_argument("--heap", choices=("reuse", "default"), default="reuse",
                        help="reuse: every run keeps freed memory for reuse (glibc thresholds "
                             "from dsq_fairseq.heap.ENVIRONMENT; the DSQ task sets them itself by "
                             "default); default: glibc's defaults for every run")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        data_bin = args.data_bin.resolve() if args.data_bin else toy_data_bin(Path(tmp))
        runs: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
        for name in names if args.warmup_updates > 0 else ():
            train_once(data_bin, Path(tmp), CONFIGS[name], DIMS[args.arch_dims],
                       args.warmup_updates, args.heap == "reuse")
        for _ in range(args.repeats):
            for name in names:  # interleaved: each round measures every configuration
                runs[name].append(
                    train_once(data_bin, Path(tmp), CONFIGS[name], DIMS[args.arch_dims],
                               args.updates, args.heap == "reuse")
                )
                print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
    fp32 = runs.get("fp32_fairseq")
    base = statistics.median(r["wps"] for r in fp32) if fp32 else None
    base_steady = statistics.median(r["wps_steady"] for r in fp32) if fp32 else None
    result = {
        "benchmark": "train_speed",
        "updates": args.updates,
        "repeats": args.repeats,
        "arch_dims": args.arch_dims,
        "threads": int(os.environ["OMP_NUM_THREADS"]),
        "warmup_updates": args.warmup_updates,
        "heap": args.heap,
        "dsq_fast": os.environ.get("DSQ_FAST", "1"),
        "configs": {},
    }
    for name, rs in runs.items():
        wps = statistics.median(r["wps"] for r in rs)
        steady = statistics.median(r["wps_steady"] for r in rs)
        # per-repeat ratios against the FP32 run of the same round, then their median
        paired = [f["wps_steady"] / r["wps_steady"] for f, r in zip(fp32, rs)] if fp32 else []
        result["configs"][name] = {
            "tokens_per_s_median": round(wps, 1),
            "tokens_per_s": [round(r["wps"], 1) for r in rs],
            "step_time_vs_fp32": round(base / wps, 3) if base else None,
            "steady_tokens_per_s_median": round(steady, 1),
            "steady_tokens_per_s": [round(r["wps_steady"], 1) for r in rs],
            "steady_step_time_vs_fp32": round(base_steady / steady, 3) if base_steady else None,
            "steady_step_time_vs_fp32_paired_median":
                round(statistics.median(paired), 3) if paired else None,
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
