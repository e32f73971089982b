"""Gradient accumulation: k micro-batches of b train exactly like one batch of k*b, in one process and under
DDP (torchrun, 2 gloo processes, no_sync on all but the last micro-batch): the same losses and, after the run,
the same weights."""

import pytest
from safetensors.torch import load_file

from inprocess import run_script
from test_recipes_ddp import RECIPES, losses, run_torchrun

STEPS = 2
# OCR's center_vision subtracts the batch's mean image feature: a micro-batch's mean is not the batch's
EXTRA = dict(ocr=["--center_vision=False"], seg_gumbel=["--stage_a_steps=1"])


def weights(path):
    return load_file(str(path / "ckpt" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_micro_batches_equal_one_batch(recipe, tmp_path):
    script = f"train_{recipe}.py"
    common = [*RECIPES[recipe], *EXTRA.get(recipe, []), f"--max_steps={STEPS}", "--log_interval=1",
              "--eval_interval=1000"]
    env = dict(OMP_NUM_THREADS="1")
    whole = losses(run_script(script, [*common, "--batch_size=4", f"--out_dir={tmp_path / 'whole'}"], env=env))
    micro = losses(run_script(script, [*common, "--batch_size=2", "--grad_accum_steps=2",
                                       f"--out_dir={tmp_path / 'micro'}"], env=env))
    assert len(whole) == STEPS and micro == pytest.approx(whole, rel=1e-4, abs=1e-4)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "micro"))
    two = run_torchrun(script, [*common, "--batch_size=1", "--grad_accum_steps=2", f"--out_dir={tmp_path / 'two'}"])
    assert two == pytest.approx(whole, rel=1e-4, abs=1e-4)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "two"))
