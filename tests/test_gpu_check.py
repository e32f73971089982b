"""gpu_check.py: without a GPU it says so in one line and exits 0; its parser reads the scripts' log lines."""
import subprocess
import sys

import torch

import gpu_check
from runtime import log_line
from test_recipes_ddp import ROOT


def test_no_gpu_path_is_one_line_and_exit_0():
    if torch.cuda.is_available():
        return  # a GPU machine runs the real check instead
    r = subprocess.run([sys.executable, "gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [f"gpu_check: no CUDA GPU visible (torch {torch.__version__}); nothing to check"]


def test_reads_the_last_step_line():
    lines = [log_line(5, 20, 3.25, 1e-3, 0.5, tokens=8000, flops_per_step=4e12, peak=1e13),
             "step 10/20 | loss 2.5000 | lr 1.0e-03 | 250 ms | 32.0k tok/s | mfu 160% | mem 12.5 GiB | stage A"]
    assert gpu_check.last_step("noise\n" + "\n".join(lines) + "\nevaluating") == (10, 2.5, 32000.0, 160, 12.5)
    assert gpu_check.last_step("no steps here") is None
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
