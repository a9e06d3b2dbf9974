"""Hardware cost model of DSQ training (DESIGN.md §4; ``docs/cost_model.md``).

* :mod:`~dsq_fairseq.cost.coefficients` — the coefficient table, each entry with its source;
* :mod:`~dsq_fairseq.cost.model` — pure functions: arithmetic and DRAM traffic of one GEMM;
* :mod:`~dsq_fairseq.cost.accounting` — per-run accounting during ``fairseq-train``;
* ``python -m dsq_fairseq.cost`` — static analysis of an architecture on a dummy batch;
* ``python -m dsq_fairseq.report`` (also ``python -m dsq_fairseq.cost.report``) — plots and a
  Markdown summary of a run.
"""

from dsq_fairseq.cost.model import FIXED16, FIXED32, Comparison, Cost, compare, gemm_cost

__all__ = ["FIXED16", "FIXED32", "Comparison", "Cost", "compare", "gemm_cost"]
