"""Two-process CPU training (gloo) through torchrun: ranks switch level together, stay identical.

fairseq logs INFO only on rank 0, so each rank's view comes from ``--dsq-trace-dir``: one JSON
line per validation round with the update, the loss, the level and a SHA-256 of the parameters.
"""

import json
import shlex
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS, fairseq_cmd, run


def read_trace(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_rank_run_switches_level_on_the_same_update_with_identical_weights(data_bin,
                                                                              tmp_path):
    trace = tmp_path / "trace"
    save_dir = tmp_path / "ck"

    def train(max_update):
        args = [
            fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
            "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en",
            *TINY_MODEL_ARGS, "--dsq-format", "bfp",
            "--dsq-schedule", "2,2,2,16;8,4,4,16;16,4,4,16", "--dsq-rounding", "stochastic",
            "--dsq-patience", "1", "--dsq-min-delta", "100", "--optimizer", "adam",
            "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy", "--max-tokens", "300",
            "--max-update", str(max_update), "--seed", "1", "--cpu",
            "--validate-interval-updates", "2", "--save-interval-updates", "2",
            "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
            "--save-dir", str(save_dir), "--dsq-trace-dir", str(trace),
            # fairseq's torchrun path divides by torch.cuda.device_count(): on CPU give it the
            # rendezvous explicitly (see README, "Multi-process training")
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-world-size", "2", "--distributed-init-method", "env://",
            "--distributed-rank", "$RANK", "--distributed-no-spawn",
        ]
        return run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "--no-python", "bash", "-c",
             "exec " + " ".join(a if a == "$RANK" else shlex.quote(a) for a in args)],
            cwd=tmp_path,
        )

    proc = train(6)
    log = proc.stdout + proc.stderr
    assert "distributed init (rank 1)" in log and "initialized host" in log
    rank0, rank1 = read_trace(trace / "dsq_trace_rank0.jsonl"), read_trace(
        trace / "dsq_trace_rank1.jsonl")
    assert [r["num_updates"] for r in rank0] == [2, 4, 6]
    assert rank0 == rank1  # same loss, same level, same parameters at every round
    assert [r["level"] for r in rank0] == [0, 1, 1]
    assert "precision level 0 -> 1" in log

    # The cost ledger sums the ranks: one process with --update-freq 2 sees exactly the batches
    # both ranks saw (legacy_ddp shards batches r, r+2, ...), so its totals must be identical.
    single_dir = tmp_path / "single"
    run([fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
         "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en", *TINY_MODEL_ARGS,
         "--dsq-format", "bfp", "--dsq-schedule", "2,2,2,16;8,4,4,16;16,4,4,16",
         "--dsq-patience", "1", "--dsq-min-delta", "100", "--optimizer", "adam", "--lr", "1e-3",
         "--criterion", "label_smoothed_cross_entropy", "--max-tokens", "300", "--update-freq",
         "2", "--max-update", "6", "--seed", "1", "--cpu", "--validate-interval-updates", "2",
         "--no-epoch-checkpoints", "--save-dir", str(single_dir)], cwd=tmp_path)
    two_ranks = json.loads((save_dir / "dsq_cost.json").read_text())
    one_rank = json.loads((single_dir / "dsq_cost.json").read_text())
    for key in ("updates", "macs", "arith", "dram", "arith_fixed32", "dram_fixed32"):
        assert two_ranks["totals"][key] == one_rank["totals"][key], key
    assert [lv["updates"] for lv in two_ranks["levels"]] == [4.0, 2.0, 0.0]

    # rank 0's checkpoint resumes in a single process at the level it reached
    single = run(
        [fairseq_cmd("fairseq-train"), str(data_bin), "--user-dir", str(REPO / "dsq_fairseq"),
         "--task", "dsq_translation", "--arch", "dsq_transformer_iwslt_de_en", *TINY_MODEL_ARGS,
         "--dsq-format", "bfp", "--dsq-schedule", "2,2,2,16;8,4,4,16;16,4,4,16",
         "--dsq-patience", "1", "--dsq-min-delta", "100", "--optimizer", "adam", "--lr", "1e-3",
         "--criterion", "label_smoothed_cross_entropy", "--max-tokens", "300",
         "--max-update", "8", "--seed", "1", "--cpu", "--validate-interval-updates", "2",
         "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
         "--save-dir", str(save_dir), "--no-save"],
        cwd=tmp_path,
    )
    resumed = single.stdout + single.stderr
    assert "@ 6 updates" in resumed
    assert "dsq_level=1" in resumed and "precision level 1 -> 2" in resumed
