"""``--dsq-packed-stash`` beyond the GEMMs: 1-bit dropout/ReLU masks, the model, fairseq-train."""

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL_ARGS, run
from test_fairseq_e2e import train_cmd
from test_model import batch, build

from dsq_fairseq.models.dsq_transformer import stash_packing_from_args
from dsq_fairseq.nn.masks import dsq_dropout, dsq_relu, pack_mask, unpack_mask
from dsq_fairseq.nn.modules import DSQDropout, DSQReLU
from dsq_fairseq.precision import DSQConfigError
from dsq_fairseq.quant import native


def bits(t):
    return t.contiguous().view(torch.int32)


def tricky(shape=(37, 5, 13)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[:5] = torch.tensor([0.0, -0.0, float("nan"), 1e-40, -1e-40])
    return x


def forward_backward(fn, x, seed=3):
    """``y``, ``dx`` and the tensors ``y``'s node saved (read before backward frees them)."""
    torch.manual_seed(seed)
    t = x.clone().requires_grad_(True)
    y = fn(t)
    saved = getattr(y.grad_fn, "saved_tensors", None)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y, t.grad, saved


def test_mask_round_trip():
    for n in (1, 7, 8, 9, 100):
        m = torch.rand(n, 3) > 0.5
        data = pack_mask(m)
        assert data.dtype == torch.uint8 and data.numel() == -(-3 * n // 8)
        assert torch.equal(unpack_mask(data, m.shape), m)


@pytest.fixture(params=["native", "torch"])
def mask_kernels(request, monkeypatch):
    """The mask bits written and applied by the native CPU kernels (where this CPU has them) or
    by torch ops."""
    if request.param == "native" and not native.available(torch.ones(1)):
        pytest.skip("native CPU kernels not available here")
    monkeypatch.setattr(native, "_enabled", request.param == "native")
    return request.param


# a tail of 5 elements after whole 16-lane chunks; and above the kernels' parallel threshold
MASK_SHAPES = [(37, 5, 13), (300, 257)]


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_is_bit_identical_and_keeps_one_bit(p, mask_kernels):
    # contiguous inputs: mask and product in one native pass; a transposed one: torch's ops
    for x in [tricky(shape) for shape in MASK_SHAPES] + [tricky((40, 33)).t()]:
        y_ref, g_ref, _ = forward_backward(lambda t: F.dropout(t, p, training=True), x)
        y, g, (saved,) = forward_backward(lambda t: dsq_dropout(t, p), x)
        assert torch.equal(bits(y.detach().nan_to_num()), bits(y_ref.detach().nan_to_num()))
        assert torch.equal(bits(g), bits(g_ref))
        assert saved.dtype == torch.uint8 and saved.numel() == -(-x.numel() // 8)
        known = (x != 0) & x.isfinite()  # there x * noise is 0 exactly where dropped
        kept = y_ref.detach() != 0
        assert torch.equal(unpack_mask(saved, x.shape)[known], kept[known])
    # the random stream advanced exactly as F.dropout's does
    torch.manual_seed(3)
    F.dropout(x, p, training=True)
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    dsq_dropout(x.requires_grad_(True), p)
    assert torch.equal(torch.rand(3), after_ref)


def test_relu_is_bit_identical_and_keeps_one_bit(mask_kernels):
    for shape in MASK_SHAPES:
        x = tricky(shape)
        y_ref, g_ref, _ = forward_backward(F.relu, x)
        y, g, (saved,) = forward_backward(dsq_relu, x)
        assert torch.equal(bits(y.detach()), bits(y_ref.detach()))
        assert torch.equal(bits(g), bits(g_ref))
        assert torch.equal(saved, pack_mask(y_ref.detach() <= 0))


def test_without_autograd_the_plain_ops_run():
    x = torch.randn(4, 8)
    assert dsq_relu(x).grad_fn is None
    with torch.no_grad():
        assert dsq_dropout(x.requires_grad_(True), 0.5).grad_fn is None


def grads(task, model, criterion):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks
    loss, _, _ = criterion(model, batch(task))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_model_installs_masks_and_packing_changes_no_gradient_bit(data_bin):
    task, model, criterion = build(
        data_bin, "--dsq-format", "bfp", "--dsq-schedule", "16,4,4,16", "--dropout", "0.3",
        "--dsq-packed-stash", "on",
    )
    assert model.dsq_runtime.stash_packing == "on"
    assert any(isinstance(m, DSQDropout) for m in model.modules())
    assert sum(isinstance(getattr(m, "activation_fn", None), DSQReLU)
               for m in model.modules()) == 2
    model.train()
    loss_on, on = grads(task, model, criterion)
    model.dsq_runtime.stash_packing = "off"
    loss_off, off = grads(task, model, criterion)
    assert torch.equal(bits(loss_on), bits(loss_off))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(on, off))


def test_bad_flag_value_is_a_config_error():
    with pytest.raises(DSQConfigError, match="--dsq-packed-stash"):
        stash_packing_from_args(argparse.Namespace(dsq_packed_stash="yes"))
    assert stash_packing_from_args(argparse.Namespace()) == "auto"


def train_losses(data_bin, tmp_path, packing, criterion="label_smoothed_cross_entropy"):
    cmd = train_cmd(data_bin, tmp_path / packing, 4, "--dsq-packed-stash", packing,
                    "--disable-validation", "--no-save")
    cmd[cmd.index("--dsq-schedule") + 1] = "16,4,4,16"
    cmd[cmd.index("--criterion") + 1] = criterion
    proc = run(cmd, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    return re.findall(r"\bloss=([0-9.]+).*?num_updates=(\d+)", log)


def test_fairseq_train_packed_and_unpacked_give_the_same_losses(data_bin, tmp_path):
    assert "--encoder-layers" in TINY_MODEL_ARGS
    # packed as the scripts train: with the criterion that recomputes the logits in backward
    on = train_losses(data_bin, tmp_path, "on", "dsq_label_smoothed_cross_entropy")
    off = train_losses(data_bin, tmp_path, "off")
    assert len(on) == 4 and on == off


def test_fairseq_train_rejects_a_bad_value_naming_the_flag(data_bin, tmp_path):
    cmd = train_cmd(data_bin, tmp_path / "ck", 2) + ["--dsq-packed-stash", "yes"]
    proc = run(cmd, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--dsq-packed-stash" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def layer_norm_grads(bits, packing, width=64):
    import torch.nn as nn

    from dsq_fairseq.nn.layernorm import DSQLayerNorm
    from dsq_fairseq.nn.runtime import DSQRuntime
    from dsq_fairseq.precision import Precision, QuantScheme

    torch.manual_seed(0)
    ln = nn.LayerNorm(width)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    ln.__class__ = DSQLayerNorm
    ln.dsq_runtime = DSQRuntime(QuantScheme("bfp"), Precision(16, 4, 4, 16),
                                stash_packing=packing, layernorm_stash_bits=bits)
    x = (torch.randn(7, 3, width) * 3 + 1).requires_grad_(True)
    y = ln(x)
    saved = [t.dtype for t in getattr(y.grad_fn, "saved_tensors", ())] or type(y.grad_fn).__name__
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return [y.detach(), x.grad, ln.weight.grad, ln.bias.grad], saved


def test_layer_norm_inputs_stay_full_precision_unless_the_flag_says_otherwise():
    ref, node = layer_norm_grads(32, "on")
    assert node == "NativeLayerNormBackward0"  # torch's own layer norm, fp32 input kept
    for bits, tol in ((16, 1e-4), (8, 2e-2)):
        on, saved = layer_norm_grads(bits, "on")
        assert saved[:2] == [torch.uint8, torch.int8]  # packed codes + exponents
        assert torch.equal(on[0], ref[0])  # the forward is unchanged
        for a, b in zip(on[1:], ref[1:]):
            assert float((a - b).abs().max() / b.abs().max()) < tol
        off, saved = layer_norm_grads(bits, "off")
        assert saved[0] == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(on, off))  # packing itself is lossless
    from dsq_fairseq.nn.runtime import check_layernorm_stash_bits
    from dsq_fairseq.precision import QuantScheme

    for bad in (1, 17, 0, "8"):
        with pytest.raises(DSQConfigError, match="--dsq-layernorm-stash-bits"):
            check_layernorm_stash_bits(bad, QuantScheme("bfp"))
    with pytest.raises(DSQConfigError, match="--dsq-layernorm-stash-bits"):
        check_layernorm_stash_bits(8, QuantScheme("mx"))
