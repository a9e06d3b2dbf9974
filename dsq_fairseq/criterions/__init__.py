"""The plugin's fairseq criteria (registered on import)."""

from dsq_fairseq.criterions import dsq_label_smoothed_cross_entropy  # noqa: F401
