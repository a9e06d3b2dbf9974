"""Q0 of a weight computed once per weight state, not once per GEMM call (issue 4).

A weight's forward operand ``Q0(W)`` depends only on the weight's values and the quantization
(width, blocking dim, scheme). Within one update they do not change: with ``--update-freq N`` the
N micro-batches, and every batch of a validation round or of inference, quantize the same weights
again. :func:`quantize_weight` returns the stored ``Q0(W)`` when it is still valid.

Validity. An entry is reused only if all of these are unchanged since it was stored:

* the *update token* of the runtime (:func:`begin`), which the ``dsq_translation`` task sets to
  ``("train", update_num)`` at every ``train_step`` and ``("valid", last update_num)`` at every
  ``valid_step``: fairseq's optimizers write the new weights through ``param.data``, which bumps
  no version counter, so the token is what marks "the optimizer may have run". Without a token
  (``None``, the default: a runtime used outside that task) nothing is cached;
* the weight object itself (held weakly) and its ``_version`` (in-place updates through the
  parameter, ``load_state_dict``) and ``data_ptr`` (storage swapped);
* the width, dim, scheme, dtype and device.

A new token invalidates every entry, so the cache never holds more than one quantized copy of
each weight (at most the model's weight memory again, in the weights' dtype). The invalidated
tensors are kept until their weight is quantized again and then written over (same shape, dtype
and device): the cache's memory stays where the first update put it instead of ~one model's
weights of fresh tensors per update landing between that step's activations (measured in-process,
3 DSQ passes: glibc heap 3.53 -> 3.34 GB, page faults 1.02M -> 0.97M). A tensor this module
returned is therefore valid only until the token changes, which is how its callers use it.

Stochastic rounding is never cached: every quantization draws fresh random numbers from the
runtime's generator, and caching would change both which numbers later GEMMs draw and the
independence of the rounding across micro-batches. Round-to-nearest is deterministic, so a cached
``Q0(W)`` is bit-identical to a recomputed one and training is unchanged (tested).
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Hashable, Optional, Tuple

import torch

from dsq_fairseq.precision import Point

__all__ = ["begin", "quantize_weight", "stats", "token"]


class _Cache:
    def __init__(self) -> None:
        self.token: Optional[Hashable] = None
        self.entries: Dict[int, Tuple[Any, ...]] = {}
        # the previous token's Q0(W) tensors by weight: their storage is written over when the
        # weight is next quantized (same shape and dtype), so each update does not scatter a
        # fresh weight-sized tensor per weight across the heap between the step's activations
        self.stale: Dict[int, Tuple[Any, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0


_caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()


def _cache(runtime: Any) -> _Cache:
    cache = _caches.get(runtime)
    if cache is None:
        cache = _caches[runtime] = _Cache()
    return cache


def begin(runtime: Any, update_token: Optional[Hashable]) -> None:
    """Declare the weights' state for ``runtime``: entries stored under another token are dropped.

    ``update_token`` must change whenever the weights may have changed without their version
    counter (an optimizer step through ``.data``); ``None`` turns caching off.
    """
    cache = _cache(runtime)
    if update_token != cache.token or update_token is None:
        if update_token is None:
            cache.stale.clear()
        else:
            cache.stale = {k: (e[0], e[2]) for k, e in cache.entries.items()}
        cache.entries.clear()
        cache.token = update_token


def token(runtime: Any) -> Optional[Hashable]:
    """The current update token of ``runtime`` (``None``: no caching)."""
    cache = _caches.get(runtime)
    return None if cache is None else cache.token


def stats(runtime: Any) -> Dict[str, int]:
    """``{"hits", "misses", "entries"}`` of ``runtime``'s cache (for tests and benchmarks)."""
    cache = _cache(runtime)
    return {"hits": cache.hits, "misses": cache.misses, "entries": len(cache.entries)}


def quantize_weight(
    runtime: Any,
    weight: torch.Tensor,
    width: Point,
    dim: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``runtime.scheme.quantize(weight, width, dim=dim, is_weight=True, generator=generator)``,
    reused while valid (module docstring); same result bit for bit."""
    scheme = runtime.scheme

    def compute() -> torch.Tensor:
        return scheme.quantize(weight, width, dim=dim, is_weight=True, generator=generator)

    cache = _caches.get(runtime)
    if cache is None or cache.token is None or scheme.rounding != "nearest":
        return compute()
    key = (width, dim, scheme, weight.dtype, weight.device, weight._version, weight.data_ptr(),
           tuple(weight.shape))
    entry = cache.entries.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        cache.hits += 1
        return entry[2]
    cache.misses += 1
    q = compute()
    if q is not weight:  # width 32 / format none: nothing to keep
        old = cache.stale.pop(id(weight), None)
        if (old is not None and old[0]() is weight and old[1].shape == q.shape
                and old[1].dtype == q.dtype and old[1].device == q.device):
            q = old[1].copy_(q)  # its previous value: nobody reads it once the token moved on
        cache.entries[id(weight)] = (weakref.ref(weight), key, q)
    return q
