"""``python -m dsq_fairseq.report PATH``: plots and Markdown summary of a DSQ run.

The implementation lives in :mod:`dsq_fairseq.cost.report` (also runnable as
``python -m dsq_fairseq.cost.report``).
"""

import sys

from dsq_fairseq.cost.report import main, write_report

__all__ = ["main", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
