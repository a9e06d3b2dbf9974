"""Allow-list the exact classes fairseq checkpoints hold, for torch's ``weights_only`` loading.

torch >= 2.6 unpickles checkpoints with ``weights_only=True``; fairseq checkpoints then fail on
the few non-tensor objects they contain. Each class below was seen in a real checkpoint of this
project (training state, ``--eval-bleu`` metrics, multi-process resume); nothing turns
weights-only loading off.
"""

from __future__ import annotations

import argparse
from typing import Any, List

import torch


def _numpy_globals() -> List[Any]:
    import numpy as np

    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy < 2
        multiarray = np.core.multiarray
    entries: List[Any] = [
        multiarray._reconstruct,
        multiarray.scalar,
        np.ndarray,
        np.dtype,
        # files written under numpy < 2 name the same functions under numpy.core
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        entries += [
            dtypes.Int64DType, dtypes.Float64DType, dtypes.Float32DType, dtypes.Int32DType,
        ]
    return entries


def allowed_checkpoint_globals() -> List[Any]:
    """The classes and functions allow-listed by :func:`register`."""
    from fairseq.distributed.utils import _TensorPlaceholder

    return [argparse.Namespace, _TensorPlaceholder, *_numpy_globals()]


def register() -> None:
    """Add :func:`allowed_checkpoint_globals` to torch's weights-only allow-list (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 loads without weights_only by default
        add(allowed_checkpoint_globals())
