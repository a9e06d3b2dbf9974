"""The quantizers on CUDA agree bit for bit with the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dsq_fairseq.quant import bfp_quantize, fixed_quantize, int_quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 100, generator=g) * torch.logspace(-30, 30, 100)
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 2.0**-140, 2.0**-149])
    x[1] = torch.randn(100, generator=g) * 2.0**-135  # subnormal blocks
    x[2] = 0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w", [2, 4, 8, 16, 31])
def test_cuda_matches_cpu(dtype, w):
    x = _inputs().to(dtype)
    xc = x.cuda()
    for dim in (0, -1):
        cpu = bfp_quantize(x, w, block_size=16, dim=dim)
        gpu = bfp_quantize(xc, w, block_size=16, dim=dim)
        assert gpu.device == xc.device and gpu.dtype == dtype
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(
        fixed_quantize(xc, w).cpu(), fixed_quantize(x, w), rtol=0, atol=0, equal_nan=True
    )
    torch.testing.assert_close(
        int_quantize(xc, w, "token").cpu(),
        int_quantize(x, w, "token"),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def test_cuda_stochastic_reproducible_and_unbiased():
    x = torch.tensor([1.0, 0.3, -0.7, 0.1], device="cuda").repeat(20000, 1)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return bfp_quantize(x, 4, block_size=4, rounding="stochastic", generator=g)

    a, b = run(1), run(1)
    assert torch.equal(a, b) and not torch.equal(a, run(2))
    col = a[:, 1].double()
    assert torch.all((col == 0.25) | (col == 0.5))
    assert abs(col.mean().item() - 0.3) < 5 * 0.25 * (0.16 / 20000) ** 0.5
