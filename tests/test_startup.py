"""Start-up: the GEMM peak is measured once per machine and cached; commands that only compose a config do not
import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from distrain.trainer.accounting import cached_peak_flops, peak_key

CPU = torch.device("cpu")


def test_the_gemm_peak_is_measured_once_then_read_until_its_key_changes(tmp_path):
    cache = tmp_path / "cache" / "peak_flops.json"
    measured = cached_peak_flops(CPU, cache)
    assert measured > 1e8
    assert json.loads(cache.read_text()) == {peak_key(CPU): measured}
    # The next call reads the file: a value no measurement gives proves it.
    cache.write_text(json.dumps({peak_key(CPU): 12345.0}))
    assert cached_peak_flops(CPU, cache) == 12345.0
    # Another thread count is another key: measured again, and both entries kept.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        other = cached_peak_flops(CPU, cache)
        assert other != 12345.0 and other > 1e8
        assert json.loads(cache.read_text()) == {peak_key(CPU).replace(f"threads={threads + 1}", f"threads={threads}"):
                                                 12345.0, peak_key(CPU): other}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # A damaged file is measured over and rewritten.
    cache.write_text("{not json")
    again = cached_peak_flops(CPU, cache)
    assert again > 1e8 and json.loads(cache.read_text()) == {peak_key(CPU): again}


def imported_modules(*args: str) -> tuple[set[str], int]:
    """The modules a `distrain` command imports (python -X importtime), and its exit code."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "distrain.cli.main", *args],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return set(lines), result.returncode


def test_printing_the_config_and_rejecting_one_import_neither_torch_nor_transformers():
    for args, code in ((["train", "+debug=tiny", "--cfg", "job"], 0), (["train", "+debug=tiny", "optim.lr=abc"], 2)):
        modules, returncode = imported_modules(*args)
        assert returncode == code
        assert "hydra" in modules and not {"torch", "transformers", "datasets"} & modules, args
