"""Optimizer-state bytes of fairseq checkpoints: ``python -m dsq_fairseq.optim CKPT [CKPT ...]``.

Loads each checkpoint with ``torch.load(weights_only=True)`` and prints the optimizer's name, the
bytes of every tensor in its saved state (``last_optimizer_state``), the number of parameter
elements it covers and what fp32 Adam (two fp32 moments) would take for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import torch

import dsq_fairseq  # noqa: F401  (allow-lists fairseq's checkpoint classes for weights-only loading)
from dsq_fairseq.optim.state_quant import fp32_adam_bytes, tensor_bytes


def checkpoint_state_bytes(path: str) -> Dict[str, Any]:
    """``{"optimizer", "state_bytes", "num_params", "fp32_adam_bytes"}`` of one checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("last_optimizer_state") or {}
    history = ckpt.get("optimizer_history") or [{}]
    model = ckpt.get("model") or {}
    per_param = state.get("state", {})
    # number of elements covered: the parameters that have a state (fp32 or codes)
    numel = 0
    for s in per_param.values():
        t = s.get("exp_avg", s.get("exp_avg_codes"))
        numel += t.numel() if isinstance(t, torch.Tensor) else 0
    return {
        "checkpoint": path,
        "optimizer": history[-1].get("optimizer_name"),
        "state_bytes": tensor_bytes(per_param),
        "num_params": numel,
        "fp32_adam_bytes": fp32_adam_bytes(numel),
        "model_params": sum(v.numel() for v in model.values() if v.is_floating_point()),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsq_fairseq.optim", description=__doc__)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args(argv)
    for path in args.checkpoints:
        r = checkpoint_state_bytes(path)
        if args.json:
            print(json.dumps(r))
        else:
            ratio = r["state_bytes"] / r["fp32_adam_bytes"] if r["fp32_adam_bytes"] else 0.0
            print(f"{path}: {r['optimizer']} optimizer state {r['state_bytes']} bytes for "
                  f"{r['num_params']} parameters ({ratio:.3f}x of fp32 adam's "
                  f"{r['fp32_adam_bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
