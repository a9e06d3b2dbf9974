"""DSQ GEMMs: autograd functions, modules and their shared runtime."""

from dsq_fairseq.nn.functional import dsq_linear, dsq_matmul
from dsq_fairseq.nn.modules import DSQLinear, DSQMultiheadAttention, install_dsq
from dsq_fairseq.nn.runtime import DSQRuntime, GemmRecord

__all__ = [
    "DSQLinear",
    "DSQMultiheadAttention",
    "DSQRuntime",
    "GemmRecord",
    "dsq_linear",
    "dsq_matmul",
    "install_dsq",
]
