"""fairseq tasks of dsq-fairseq (importing registers them)."""

from dsq_fairseq.tasks import dsq_translation  # noqa: F401
