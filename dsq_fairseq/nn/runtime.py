"""Per-model runtime state shared by every DSQ GEMM of one model.

The runtime is a plain Python object (not an ``nn.Module``), so it never enters a state dict: the
persistent state (the precision level) lives in the schedule's buffers, which push the level they
hold into the runtime whenever it changes or is loaded from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dsq_fairseq.precision import FULL_PRECISION, Precision, QuantScheme


@dataclass(frozen=True)
class GemmRecord:
    """One forward GEMM as it ran: ``(batch x) [m, k] @ [k, n]``.

    ``kind`` is ``"linear"`` (activation x weight) or ``"matmul"`` (activation x activation);
    ``batch`` is the number of independent GEMMs (1 for linear); ``training`` says whether the
    backward GEMMs will follow.
    """

    kind: str
    name: str
    batch: int
    m: int
    k: int
    n: int
    precision: Precision
    training: bool


GemmObserver = Callable[[GemmRecord], None]


class DSQRuntime:
    """What every DSQ GEMM of a model reads: the scheme, the current precision and RNG streams.

    ``precision`` is set by the schedule (never by the GEMMs). ``seed`` seeds one
    ``torch.Generator`` per device for stochastic rounding, so a run is reproducible from the seed;
    distributed ranks pass ``seed + rank``.
    """

    def __init__(self, scheme: QuantScheme, precision: Precision, seed: int = 1) -> None:
        self.scheme = scheme
        self.precision = precision
        self.seed = seed
        self._generators: Dict[Tuple[str, Optional[int]], torch.Generator] = {}
        self.observers: List[GemmObserver] = []

    @property
    def active(self) -> bool:
        """False when nothing would be quantized: the GEMMs then take the plain torch path."""
        return self.scheme.enabled and any(b < FULL_PRECISION for b in self.precision.bits)

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The stochastic-rounding stream for ``device`` (``None`` for round-to-nearest)."""
        if self.scheme.rounding != "stochastic":
            return None
        key = (device.type, device.index)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def observe(self, record: GemmRecord) -> None:
        for observer in self.observers:
            observer(record)
