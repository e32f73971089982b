"""compile=True on CPU (inductor's C++ backend): each recipe trains a few steps compiled, with the loss of every
step within 1e-3 (relative) of the eager run's. Inductor reorders float sums, so the losses agree to float
rounding, not bit for bit. Costly (a cold compile of each recipe's tiny model), so one run per recipe."""
import re

import pytest

from inprocess import run_script
from test_recipes_ddp import RECIPES

STEPS = 3


def losses(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([-\d.]+)", r.stdout, re.M)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compiled_equals_eager(recipe, tmp_path, monkeypatch):
    import torch._inductor.config
    # inductor draws random numbers its own way; eager's draws keep Seg's Gumbel noise and dropout comparable
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    extra = ["--stage_a_steps=2"] if recipe == "seg_gumbel" else []  # both stages, compiled
    args = [*RECIPES[recipe], *extra, f"--max_steps={STEPS}", "--log_interval=1", "--eval_interval=1000", "--batch_size=2"]
    eager = losses(run_script(f"train_{recipe}.py", [*args, f"--out_dir={tmp_path / 'eager'}"]))
    compiled = losses(run_script(f"train_{recipe}.py", [*args, "--compile=True", f"--out_dir={tmp_path / 'compiled'}"]))
    assert len(eager) == STEPS and len(compiled) == STEPS, (eager, compiled)
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
