"""Per-rank record of the schedule, for checking that distributed ranks agree.

With ``--dsq-trace-dir DIR`` every rank appends one JSON line per validation round to
``DIR/dsq_trace_rank{R}.jsonl``: the update count, the validation loss the schedule saw, the
level in force afterwards, and a SHA-256 of all parameters (bytes of every tensor in
``named_parameters`` order). Identical lines across ranks mean the ranks switched level at the
same update and hold identical weights.
"""

import hashlib
import json
import os
from typing import Any, Dict

import torch


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the bytes of every parameter (names included), in a fixed order."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def append_round(trace_dir: str, rank: int, record: Dict[str, Any]) -> str:
    """Append ``record`` as one JSON line to ``trace_dir/dsq_trace_rank{rank}.jsonl``."""
    os.makedirs(trace_dir, exist_ok=True)
    path = os.path.join(trace_dir, f"dsq_trace_rank{rank}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path
