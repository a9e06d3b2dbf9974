"""Block-layout helpers shared by the quantizers and the packing code."""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor


def pad_rows(t3: Tensor, pad: int) -> Tensor:
    """``t3 [pre, n, post]`` zero-padded to ``[pre, n + pad, post]``: like ``F.pad(t3, (0, 0, 0,
    pad))``, but only the ``pad`` new rows are zero-filled (``F.pad`` fills the whole output
    first, a full extra pass)."""
    pre, n, post = t3.shape
    out = t3.new_empty((pre, n + pad, post))
    out[:, :n].copy_(t3)
    out[:, n:].zero_()
    return out


def pnq(shape: Sequence[int], dim: int) -> Tuple[int, int, int]:
    """``(P, n, Q)``: the sizes before, at and after ``dim`` (``(1, 1, 1)`` for a 0-d shape)."""
    p = 1
    for s in shape[:dim]:
        p *= s
    q = 1
    for s in shape[dim + 1:]:
        q *= s
    return p, (shape[dim] if len(shape) else 1), q
