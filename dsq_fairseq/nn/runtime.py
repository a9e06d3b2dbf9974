"""Per-model runtime state shared by every DSQ GEMM of one model.

The runtime is a plain Python object (not an ``nn.Module``), so it never enters a state dict: the
persistent state (the precision level) lives in the schedule's buffers, which push the level they
hold into the runtime whenever it changes or is loaded from a checkpoint.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from dsq_fairseq.precision import FULL_PRECISION, DSQConfigError, Point, Precision, QuantScheme

STASH_PACKING = ("auto", "on", "off")
"""``--dsq-packed-stash``: ``auto`` packs the q1 stash when q1 < 16 bits, ``on`` whenever q1 is
packable (2..16 bits), ``off`` keeps the fake-quantized fp32 stash."""


def check_stash_packing(value: str) -> str:
    """``--dsq-packed-stash``: one of :data:`STASH_PACKING` (returned), else
    :class:`DSQConfigError`."""
    if value not in STASH_PACKING:
        raise DSQConfigError(
            f"--dsq-packed-stash: unknown value '{value}'; allowed: {', '.join(STASH_PACKING)}"
        )
    return value


def check_layernorm_stash_bits(bits: int, scheme: QuantScheme) -> None:
    """``--dsq-layernorm-stash-bits``: 32 (layer-norm inputs kept in full precision) or a width
    2..16 of the scheme's format (``bfp``, ``fixed`` or ``int``); else :class:`DSQConfigError`."""
    if bits == FULL_PRECISION:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise DSQConfigError(
            f"--dsq-layernorm-stash-bits: {bits!r} is not 32 (full precision) or a width 2..16"
        )
    if scheme.format not in ("bfp", "fixed", "int"):
        raise DSQConfigError(
            f"--dsq-layernorm-stash-bits {bits} needs --dsq-format bfp, fixed or int "
            f"(got {scheme.format})"
        )


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
    distributed ranks pass ``seed + rank``. ``stash_packing`` (:data:`STASH_PACKING`) says whether
    the GEMMs keep their q1 stash packed (:mod:`dsq_fairseq.quant.packing`);
    ``layernorm_stash_bits`` < 32 stashes layer-norm inputs quantized at that width (lossy).
    """

    def __init__(
        self,
        scheme: QuantScheme,
        precision: Precision,
        seed: int = 1,
        stash_packing: str = "auto",
        layernorm_stash_bits: int = FULL_PRECISION,
    ) -> None:
        check_stash_packing(stash_packing)
        check_layernorm_stash_bits(layernorm_stash_bits, scheme)
        self.scheme = scheme
        self.precision = precision
        self.seed = seed
        self.stash_packing = stash_packing
        self.layernorm_stash_bits = layernorm_stash_bits
        self._generators: Dict[Tuple[str, Optional[int]], torch.Generator] = {}
        self.observers: List[GemmObserver] = []
        self._stash_cache: Dict[Tuple[int, Any], tuple] = {}
        self._q0_shared: Optional[Dict[Tuple[int, Any], tuple]] = None

    def packs_stash(self, width: Point) -> bool:
        """Whether a q1 stash at ``width`` is kept packed (MX and fp32 points never are)."""
        if self.stash_packing == "off" or isinstance(width, str) or width >= FULL_PRECISION:
            return False
        return width <= 16 if self.stash_packing == "on" else width < 16

    @property
    def packs_masks(self) -> bool:
        """Whether the DSQ model's dropouts and ReLUs keep 1-bit masks (lossless; all but
        ``off``)."""
        return self.stash_packing != "off"

    def stash_lookup(self, tensor: torch.Tensor, key: Any) -> Optional[tuple]:
        """The packed stash stored for this very tensor object (same version, same ``key``)
        while it and the stash are still alive, else ``None``. Holds no strong reference."""
        entry = self._stash_cache.get((id(tensor), key))
        if entry is None:
            return None
        ref, version, refs, meta = entry
        if ref() is not tensor or tensor._version != version:
            return None
        tensors = tuple(r() for r in refs)
        return None if any(t is None for t in tensors) else (tensors, meta)

    def stash_store(self, tensor: torch.Tensor, key: Any, tensors: tuple, meta: Any) -> None:
        """Remember the packed stash of ``tensor`` under ``key`` (weak references only; entries
        whose tensor or stash died are dropped here, so the cache stays as small as the graph)."""
        self._stash_cache = {
            k: e for k, e in self._stash_cache.items()
            if e[0]() is not None and all(r() is not None for r in e[2])
        }
        self._stash_cache[(id(tensor), key)] = (
            weakref.ref(tensor), tensor._version, tuple(weakref.ref(t) for t in tensors), meta
        )

    @contextlib.contextmanager
    def sharing_inputs(self) -> Iterator[None]:
        """A block (one attention's q/k/v projections) within which DSQ linears that read the
        very same input tensor (same version) compute its ``Q0(x)`` once
        (:meth:`shared_q0` / :meth:`offer_q0`; round-to-nearest only, which is deterministic,
        so bit-identical). The block holds those tensors; they are dropped when it ends."""
        outer = self._q0_shared
        if outer is None:
            self._q0_shared = {}
        try:
            yield
        finally:
            if outer is None:
                self._q0_shared = None

    def shared_q0(self, x: torch.Tensor, key: Any) -> Optional[torch.Tensor]:
        """The ``Q0(x)`` another linear of the current :meth:`sharing_inputs` block offered for
        this very ``x`` under ``key``, else ``None``."""
        if self._q0_shared is None or self.scheme.rounding != "nearest":
            return None
        entry = self._q0_shared.get((id(x), key))
        if entry is None or entry[0] is not x or entry[1] != x._version:
            return None
        return entry[2]

    def offer_q0(self, x: torch.Tensor, key: Any, xq: torch.Tensor) -> None:
        """Keep ``xq = Q0(x)`` for the other linears of the current block (no-op outside one
        and with stochastic rounding)."""
        if self._q0_shared is not None and self.scheme.rounding == "nearest":
            self._q0_shared[(id(x), key)] = (x, x._version, xq)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stash_cache"] = {}  # weak references don't pickle
        state["_q0_shared"] = None
        return state

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
