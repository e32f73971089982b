"""The README's fork story: one recipe is its script, its data_<recipe>.py and the shared modules. Copied alone
into an empty directory, each recipe trains a few steps, evaluates and writes results.json there."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_recipes_ddp import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ["model.py", "runtime.py", "checkpoint.py", "data.py", "configurator.py"]
DATA_MODULE = dict(lanelm="data_lanelm.py", pointer="data_pointer.py", ocr="data_ocr.py", seg_gumbel="data_seg.py",
                   foveated="data_foveated.py")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_runs_from_its_own_files_alone(recipe, tmp_path):
    fork = tmp_path / "fork"
    fork.mkdir()
    for name in SHARED + [f"train_{recipe}.py", DATA_MODULE[recipe]]:
        shutil.copy(os.path.join(ROOT, name), fork / name)
    steps = ["--max_steps=2", "--eval_interval=2", "--log_interval=1", "--batch_size=2"]
    if recipe == "seg_gumbel":
        steps.append("--stage_a_steps=1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # nothing from the repo on the path
    r = subprocess.run([sys.executable, f"train_{recipe}.py", *RECIPES[recipe], *steps, "--out_dir=run"],
                       cwd=fork, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.load(open(fork / "run" / "results.json"))
    assert results["recipe"] == recipe.split("_")[0] or results["recipe"] == recipe
    assert results["step"] == 2 and results["metrics"]
    assert set(os.listdir(fork)) <= set(SHARED) | {f"train_{recipe}.py", DATA_MODULE[recipe], "run", "__pycache__"}
