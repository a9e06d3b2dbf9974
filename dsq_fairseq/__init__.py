"""dsq-fairseq: Dynamic Stashing Quantization for fairseq (load with ``--user-dir dsq_fairseq``).

Importing the package registers the ``dsq_transformer`` model and its architectures, the
``dsq_translation`` task, the ``dsq_adam`` optimizer and the
``dsq_label_smoothed_cross_entropy`` criterion, allow-lists the classes fairseq checkpoints
hold for torch's weights-only loading, and makes ``--dsq-*`` user errors exit without a traceback.
"""

from dsq_fairseq import criterions, models, optim, tasks  # noqa: F401  (registers with fairseq)
from dsq_fairseq.errors import install_excepthook
from dsq_fairseq.safe_globals import register as _register_safe_globals

__version__ = "0.1.0"

_register_safe_globals()
install_excepthook()
