"""Shared fixtures: a tiny toy corpus preprocessed by the real ``fairseq-preprocess``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: one intra-op thread each, not one per core each
    import torch

    torch.set_num_threads(1)

# 1-layer, 32-dim model so every fairseq command in the tests takes seconds on 2 cores.
TINY_MODEL_ARGS: List[str] = [
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def fairseq_cmd(name: str) -> str:
    """Path of a fairseq console script in this interpreter's environment."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def run(cmd: List[str], cwd: Path, check: bool = True, stdin: str = None, timeout: int = 600,
        env: dict = None):
    env = {**os.environ, **(env or {})}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # checkpoints must load weights-only
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        cmd, cwd=str(cwd), env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory) -> Path:
    """A word-level toy corpus (300 train / 40 valid / 40 test pairs) in fairseq binary form."""
    from dsq_fairseq.data.toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("toy")
    write_corpus(str(root / "raw"), 300, 40, 40, seed=7)
    run(
        [
            fairseq_cmd("fairseq-preprocess"), "--source-lang", "de", "--target-lang", "en",
            "--trainpref", str(root / "raw" / "train"), "--validpref", str(root / "raw" / "valid"),
            "--testpref", str(root / "raw" / "test"), "--destdir", str(root / "bin"),
            "--joined-dictionary", "--workers", "1",
        ],
        cwd=root,
    )
    return root / "bin"


@pytest.fixture(scope="session")
def spm_data(tmp_path_factory) -> Path:
    """The toy corpus through ``scripts/prepare_data.sh`` (sentencepiece + fairseq-preprocess):
    ``ROOT/data-bin`` and the raw test reference ``ROOT/raw/test.en``."""
    from dsq_fairseq.data.toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("spm_toy")
    write_corpus(str(root / "corpus"), 400, 40, 40, seed=11)
    run(["bash", str(REPO / "scripts" / "prepare_data.sh"), str(root / "corpus"), str(root),
         "200"], cwd=root)
    return root
