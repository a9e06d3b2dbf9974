"""Block-layout helpers shared by the quantizers and the packing code."""

from __future__ import annotations

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
