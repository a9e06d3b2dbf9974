"""fairseq optimizers of dsq-fairseq (importing registers ``dsq_adam``)."""

from dsq_fairseq.optim import dsq_adam  # noqa: F401
