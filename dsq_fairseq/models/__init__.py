"""fairseq models of dsq-fairseq (importing registers them)."""

from dsq_fairseq.models import dsq_transformer  # noqa: F401
