"""``dsq_transformer`` built through fairseq's own parser: every GEMM is a DSQ GEMM."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO, TINY_MODEL_ARGS, fairseq_cmd, run

from dsq_fairseq.nn import DSQLinear, DSQMultiheadAttention


def build(data_bin: Path, *extra: str):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"), "--task", "dsq_translation",
         "--arch", "dsq_transformer_iwslt_de_en", "--cpu", *TINY_MODEL_ARGS,
         "--criterion", "label_smoothed_cross_entropy", *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def batch(task, n=8):
    dataset = task.dataset("valid")
    return dataset.collater([dataset[i] for i in range(n)])


# 1 encoder layer (self-attn q,k,v,out + fc1, fc2) + 1 decoder layer (self-attn 4, cross-attn 4,
# fc1, fc2) + output projection; three attention modules with two matmuls each.
EXPECTED_LINEARS = 6 + 10 + 1
EXPECTED_MATMULS = 2 * 3


def test_every_linear_and_attention_is_converted(data_bin):
    _, model, _ = build(data_bin, "--dsq-format", "bfp")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == EXPECTED_LINEARS
    assert all(isinstance(m, DSQLinear) for m in linears)
    attention = [m for m in model.modules() if hasattr(m, "q_proj")]
    assert len(attention) == 3 and all(isinstance(m, DSQMultiheadAttention) for m in attention)


def test_dsq_gemms_run_in_training_not_the_fused_attention(data_bin, monkeypatch):
    task, model, criterion = build(data_bin, "--dsq-format", "bfp", "--dsq-schedule", "8,4,4,8")

    def forbidden(*args, **kwargs):
        raise AssertionError("F.multi_head_attention_forward bypasses the DSQ projections")

    monkeypatch.setattr(F, "multi_head_attention_forward", forbidden)
    seen = []
    model.dsq_runtime.observers.append(seen.append)
    model.train()
    loss, _, _ = criterion(model, batch(task))
    loss.backward()
    kinds = [r.kind for r in seen]
    assert kinds.count("linear") == EXPECTED_LINEARS and kinds.count("matmul") == EXPECTED_MATMULS
    assert all(r.training and str(r.precision) == "8,4,4,8" for r in seen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dsq_gemms_run_in_beam_search(data_bin):
    from fairseq.sequence_generator import SequenceGenerator

    task, model, _ = build(data_bin, "--dsq-format", "bfp")
    model.eval()
    seen = []
    model.dsq_runtime.observers.append(seen.append)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=5)
    sample = batch(task, 4)
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    assert len(hypos) == 4
    assert {r.kind for r in seen} == {"linear", "matmul"} and not any(r.training for r in seen)
    # incremental decoding: the decoder ran once per step with one query position
    assert any(r.name.endswith("self_attn.qk") and r.m == 1 for r in seen)


def test_skip_attention_matmul_keeps_projections_quantized(data_bin):
    task, model, criterion = build(data_bin, "--dsq-skip-attention-matmul")
    seen = []
    model.dsq_runtime.observers.append(seen.append)
    criterion(model, batch(task))[0].backward()
    matmuls = [r for r in seen if r.kind == "matmul"]
    assert len(matmuls) == EXPECTED_MATMULS  # still seen by the cost model, at full precision
    assert all(str(r.precision) == "32,32,32,32" for r in matmuls)
    assert all(str(r.precision) != "32,32,32,32" for r in seen if r.kind == "linear")


def test_format_none_installs_nothing_and_keeps_fairseq_modules(data_bin):
    _, model, _ = build(data_bin, "--dsq-format", "none")
    assert not any(isinstance(m, (DSQLinear, DSQMultiheadAttention)) for m in model.modules())
    assert {"dsq_schedule.level", "dsq_schedule.best_loss"} <= set(model.state_dict())


def train_losses(data_bin: Path, tmp: Path, arch: str, *extra: str):
    proc = run(
        [fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
         "--arch", arch, *TINY_MODEL_ARGS, "--optimizer", "adam", "--lr", "1e-3",
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--dropout", "0.1", "--max-tokens", "500", "--max-update", "4", "--seed", "3", "--cpu",
         "--log-format", "simple", "--log-interval", "1", "--no-save",
         "--save-dir", str(tmp / arch), *extra],
        cwd=tmp,
    )
    return re.findall(r"\| loss=([0-9.]+)|loss=([0-9.]+)", proc.stdout + proc.stderr)


def test_format_none_reproduces_fairseq_transformer_losses(data_bin, tmp_path):
    fairseq_losses = train_losses(data_bin, tmp_path, "transformer_iwslt_de_en")
    dsq_losses = train_losses(
        data_bin, tmp_path, "dsq_transformer_iwslt_de_en", "--task", "dsq_translation",
        "--dsq-format", "none",
    )
    assert len(fairseq_losses) >= 4
    assert dsq_losses == fairseq_losses


@pytest.mark.parametrize("fmt", ["bfp", "fixed", "int"])
def test_every_format_trains(data_bin, fmt):
    task, model, criterion = build(data_bin, "--dsq-format", fmt, "--dsq-schedule", "6,4,4,8",
                                   "--dsq-int-granularity", "token")
    loss = criterion(model, batch(task))[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
