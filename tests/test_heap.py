"""``dsq_fairseq.heap``: glibc keeps freed memory for reuse once the DSQ task applies it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dsq_fairseq import heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


@glibc
def test_thresholds_take_effect_in_a_fresh_process():
    """After ``reuse_freed_memory`` a freed 8 MiB block is handed out again (same address), as
    with the environment variables; without it glibc unmaps it (mmap threshold 128 KiB at start),
    so the next allocation faults in fresh pages."""
    code = (
        "import ctypes, sys\n"
        "from dsq_fairseq import heap\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "if sys.argv[1] == '1': assert heap.reuse_freed_memory() and heap.reuse_freed_memory()\n"
        "n = 8 << 20\n"
        "a = libc.malloc(n); b = libc.malloc(64); libc.free(a)\n"
        "c = libc.malloc(n); print(int(a == c))\n"
    )
    run = [subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                          check=True).stdout.strip() for flag in ("0", "1")]
    assert run == ["0", "1"]


def test_environment_names_the_same_thresholds():
    assert heap.ENVIRONMENT == {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@glibc
@pytest.mark.parametrize("flag", [[], ["--dsq-no-heap-reuse"]])
def test_dsq_task_applies_it_unless_told_not_to(tmp_path, flag):
    for lang in ("de", "en"):
        (tmp_path / f"dict.{lang}.txt").write_text("hallo 5\nwelt 3\n")
    code = (
        "import sys\n"
        "from fairseq import options, tasks\n"
        "from fairseq.dataclass.utils import convert_namespace_to_omegaconf\n"
        "from dsq_fairseq import heap\n"
        "parser = options.get_training_parser()\n"
        "args = options.parse_args_and_arch(parser, sys.argv[1:])\n"
        "tasks.setup_task(convert_namespace_to_omegaconf(args).task)\n"
        "print('applied' if heap._applied else 'not applied')\n"
    )
    argv = [str(tmp_path), "--user-dir", str(heap.__file__).rsplit("/", 1)[0], "--task",
            "dsq_translation", "--arch", "dsq_transformer_demo", "-s", "de", "-t", "en", *flag]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ("not applied" if flag else "applied")
