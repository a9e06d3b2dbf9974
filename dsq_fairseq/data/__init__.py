"""Demo data pipeline: a synthetic de->en toy corpus (``python -m dsq_fairseq.data.toy_corpus``)
and a sacreBLEU scorer for fairseq-generate output (``python -m dsq_fairseq.data.score``).

Submodules are imported lazily so that ``python -m`` on them does not import them twice.
"""

import importlib

_EXPORTS = {
    "write_corpus": "toy_corpus",
    "generate_pairs": "toy_corpus",
    "read_hypotheses": "score",
    "HypothesisCountError": "score",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
