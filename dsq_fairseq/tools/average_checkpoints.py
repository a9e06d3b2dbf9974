"""Average the model parameters of the last N fairseq checkpoints of a directory.

    python -m dsq_fairseq.tools.average_checkpoints CKPT_DIR OUT.pt [--num 5]

Candidates are epoch checkpoints ``checkpointE.pt`` (newest epochs first) or, when there are
none, update checkpoints ``checkpoint_E_U.pt`` (newest updates first); with neither,
``checkpoint_last.pt`` alone. Floating-point model tensors are averaged in float64 and cast back;
integer tensors (the DSQ schedule's level and counters) and everything else (config, optimizer
history) come from the newest checkpoint. Checkpoints are read with ``weights_only=True``
(importing :mod:`dsq_fairseq` allow-lists what fairseq checkpoints hold).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List

import torch

import dsq_fairseq  # noqa: F401  (weights-only allow-list)


def last_checkpoints(ckpt_dir: Path, num: int) -> List[Path]:
    """The newest ``num`` checkpoints of ``ckpt_dir``, newest first (see module docstring)."""
    epochs = sorted(
        ((int(m.group(1)), p) for p in ckpt_dir.glob("checkpoint*.pt")
         if (m := re.fullmatch(r"checkpoint(\d+)\.pt", p.name))),
        reverse=True,
    )
    if epochs:
        return [p for _, p in epochs[:num]]
    updates = sorted(
        ((int(m.group(2)), p) for p in ckpt_dir.glob("checkpoint_*_*.pt")
         if (m := re.fullmatch(r"checkpoint_(\d+)_(\d+)\.pt", p.name))),
        reverse=True,
    )
    if updates:
        return [p for _, p in updates[:num]]
    last = ckpt_dir / "checkpoint_last.pt"
    if not last.exists():
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
    return [last]


def average(paths: List[Path]) -> dict:
    """The newest checkpoint's state with its float model tensors replaced by the mean."""
    newest = torch.load(paths[0], map_location="cpu", weights_only=True)
    sums = {k: v.double().clone() for k, v in newest["model"].items() if v.is_floating_point()}
    for path in paths[1:]:
        model = torch.load(path, map_location="cpu", weights_only=True)["model"]
        if set(model) != set(newest["model"]):
            raise ValueError(f"{path} holds other parameters than {paths[0]}")
        for k in sums:
            sums[k] += model[k].double()
    for k, total in sums.items():
        newest["model"][k] = (total / len(paths)).to(newest["model"][k].dtype)
    return newest


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=5, help="how many checkpoints (default 5)")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    paths = last_checkpoints(args.ckpt_dir, args.num)
    torch.save(average(paths), args.out)
    print(json.dumps({"averaged": [p.name for p in paths], "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
