"""The real fairseq commands: train with a level rise, resume at that level, generate, interact."""

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS, fairseq_cmd, run

USER_DIR = str(REPO / "dsq_fairseq")


def train_cmd(data_bin: Path, save_dir: Path, max_update: int, *extra: str):
    return [
        fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", USER_DIR,
        "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en", *TINY_MODEL_ARGS,
        "--dsq-format", "bfp", "--dsq-schedule", "2,2,2,16;16,4,4,16",
        # every round after the first counts as "no improvement": the level rises at round 2
        "--dsq-patience", "1", "--dsq-min-delta", "100",
        "--optimizer", "adam", "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy",
        "--max-tokens", "500", "--max-update", str(max_update), "--seed", "1", "--cpu",
        "--validate-interval-updates", "2", "--save-interval-updates", "2",
        "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
        "--save-dir", str(save_dir), *extra,
    ]


def levels_by_update(log: str):
    """``{num_updates: dsq_level}`` from the train_inner lines."""
    return {
        int(m.group(2)): int(m.group(1))
        for m in re.finditer(r"dsq_level=(\d+).*?num_updates=(\d+)", log)
    }


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    save_dir = tmp / "checkpoints"
    first = run(train_cmd(data_bin, save_dir, 6), cwd=tmp)
    resumed = run(train_cmd(data_bin, save_dir, 9), cwd=tmp)
    return tmp, save_dir, first.stdout + first.stderr, resumed.stdout + resumed.stderr


def test_level_rises_on_the_plateau_and_is_logged(trained):
    _, _, log, _ = trained
    assert "precision level 0 -> 1, [2,2,2,16] -> [16,4,4,16] after update 4" in log
    levels = levels_by_update(log)
    assert [levels[u] for u in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    assert re.search(r"valid \|.*dsq_level 0 \| dsq_bits 2 .*num_updates 2\b", log)
    assert re.search(r"valid \|.*dsq_level 1 \| dsq_bits 4 .*num_updates 6\b", log)


def test_checkpoint_holds_the_schedule_and_loads_weights_only(trained):
    _, save_dir, _, _ = trained
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True, map_location="cpu")
    assert int(state["model"]["dsq_schedule.level"]) == 1


def test_resume_continues_at_the_raised_level(trained):
    _, _, _, log = trained
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 6 updates\)", log)
    levels = levels_by_update(log)
    assert sorted(levels) == [7, 8, 9] and set(levels.values()) == {1}
    assert "precision level" not in log  # no second rise: it was already at the last level


def test_generate_translates_every_test_sentence(trained, data_bin):
    tmp, save_dir, _, _ = trained
    proc = run(
        [fairseq_cmd("fairseq-generate"), str(data_bin), "--user-dir", USER_DIR,
         "--path", str(save_dir / "checkpoint_last.pt"), "--gen-subset", "test", "--beam", "3",
         "--batch-size", "16", "--required-batch-size-multiple", "1", "--max-len-b", "10",
         "--scoring", "sacrebleu", "--cpu"],
        cwd=tmp,
    )
    assert len(re.findall(r"^H-\d+\t", proc.stdout, flags=re.M)) == 40
    assert "Generate test with beam=3" in proc.stdout


def test_interactive_translates_stdin(trained, data_bin):
    tmp, save_dir, _, _ = trained
    proc = run(
        [fairseq_cmd("fairseq-interactive"), str(data_bin), "--user-dir", USER_DIR,
         "--path", str(save_dir / "checkpoint_best.pt"), "--beam", "2", "--max-len-b", "8",
         "--source-lang", "de", "--target-lang", "en", "--cpu"],
        cwd=tmp, stdin="Der Hund .\nEin Haus .\n",
    )
    assert len(re.findall(r"^H-\d+\t", proc.stdout, flags=re.M)) == 2


BAD_INPUTS = [
    (["--dsq-schedule", "16,4,4"], "--dsq-schedule"),
    (["--dsq-schedule", "16,4,4,33"], "--dsq-schedule"),
    (["--dsq-schedule", "16,4,1,16"], "--dsq-schedule"),
    (["--dsq-schedule", "16,4,4,16;2,2,2,16"], "--dsq-schedule"),
    (["--dsq-schedule", "16;4"], "--dsq-schedule"),
    (["--dsq-format", "posit"], "--dsq-format"),
    (["--dsq-rounding", "up"], "--dsq-rounding"),
    (["--dsq-int-granularity", "row"], "--dsq-int-granularity"),
    (["--dsq-block-size", "0"], "--dsq-block-size"),
    (["--dsq-exponent-bits", "9"], "--dsq-exponent-bits"),
    (["--dsq-patience", "0"], "--dsq-patience"),
]


@pytest.mark.parametrize("args, flag", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_training_naming_the_flag(data_bin, tmp_path, args, flag):
    cmd = train_cmd(data_bin, tmp_path / "ck", 2)
    # later flags win in argparse: append the bad value
    proc = run(cmd + args, cwd=tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert flag in proc.stderr, output[-2000:]
    assert "Traceback" not in output
    assert "Start iterating over samples" not in output
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


def test_dsq_task_with_a_plain_transformer_is_a_clear_error(data_bin, tmp_path):
    full = train_cmd(data_bin, tmp_path / "ck", 2)
    cmd = [a for a, prev in zip(full, [""] + full) if not (a + prev).count("--dsq")]
    cmd[cmd.index("dsq_transformer_iwslt_de_en")] = "transformer_iwslt_de_en"
    proc = run(cmd, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--task dsq_translation: the model has no DSQ precision schedule" in proc.stderr


def test_hydra_train_with_yaml_config(data_bin, tmp_path):
    proc = run(
        [fairseq_cmd("fairseq-hydra-train"), "--config-dir", str(REPO / "configs" / "demo"),
         "--config-name", "dsq_demo", f"task.data={data_bin}", f"common.user_dir={USER_DIR}",
         "optimization.max_update=3", "common.log_interval=1",
         f"checkpoint.save_dir={tmp_path / 'ck'}",
         "+model.encoder_layers=1", "+model.decoder_layers=1", "+model.encoder_embed_dim=32",
         "+model.decoder_embed_dim=32", "+model.encoder_ffn_embed_dim=64",
         "+model.decoder_ffn_embed_dim=64", "model.dsq_schedule='8,4,4,16'",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert "dsq_q0=8" in log and "dsq_bits=4" in log
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    assert "dsq_schedule.level" in state["model"]


def test_eval_bleu_checkpoint_resumes_weights_only(data_bin, tmp_path):
    """``--eval-bleu`` puts numpy scalars into the checkpoint (best BLEU); the plugin's
    allow-list must let the resume load it under torch's weights-only default."""
    save_dir = tmp_path / "ck"
    eval_bleu = ["--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 8}',
                 "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric"]
    first = run(train_cmd(data_bin, save_dir, 2, *eval_bleu), cwd=tmp_path)
    assert re.search(r"valid \|.*\| bleu [\d.]+", first.stdout + first.stderr)
    resumed = run(train_cmd(data_bin, save_dir, 4, *eval_bleu), cwd=tmp_path)
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 2 updates\)", log)
    assert "num_updates 4" in log


@pytest.mark.parametrize("override, key", [
    ("model.dsq_schedule='8,4,4'", "model.dsq_schedule"),
    ("model.dsq_patience=0", "model.dsq_patience"),
    ("+model.dsq_packed_stash=bogus", "model.dsq_packed_stash"),
])
def test_hydra_bad_input_is_one_line_naming_the_yaml_key(data_bin, tmp_path, override, key):
    proc = run(
        [fairseq_cmd("fairseq-hydra-train"), "--config-dir", str(REPO / "configs" / "demo"),
         "--config-name", "dsq_demo", f"task.data={data_bin}", f"common.user_dir={USER_DIR}",
         "optimization.max_update=1", f"checkpoint.save_dir={tmp_path / 'ck'}", override,
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path, check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsq-fairseq: error:")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()
