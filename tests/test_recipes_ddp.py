"""Recipes under real torch.distributed (torchrun, gloo, 2 CPU processes): the same loss trajectory and
the same final weights as one process on the same global batch; only rank 0 writes.
(LaneLM once drifted here: a conv bias in front of GroupNorm has a pure-noise gradient that Adam scales up to
full steps, differently for 1 and 2 processes. Its convs now have no bias.)"""
import os
import re
import subprocess
import sys

import pytest

from inprocess import run_script
from runtime import TEARDOWN_WARNING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny shapes per recipe; batch_size is per rank (the 1-process run gets twice as much: PER_RANK_BATCH)
RECIPES = {
    "ocr": ["--image_size=32", "--sam_dim=16", "--sam_window=4", "--neck_dim=8", "--clip_layers=1", "--n_layer=1",
            "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--n_eval=4", "--eval_batch=4", "--max_text_tokens=16",
            "--bench_tokens=4", "--max_lines=1", "--font_sizes=(10,)", "--max_train_seconds=0"],
    "seg_gumbel": ["--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--n_layer=1", "--n_embd=32", "--n_head=2",
                   "--n_kv_head=2", "--dec_dim=16", "--n_eval=4", "--eval_batch_size=4", "--n_vis=2",
                   "--max_caption_len=8", "--stage_a_steps=4"],
    "foveated": ["--device=cpu", "--n_frames=4", "--image_size=16", "--vit_layers=2", "--vit_width=32", "--n_embd=32",
                 "--n_layer=1", "--query_dim=16", "--latent_channels=4", "--n_distractors=2", "--n_eval=4",
                 "--eval_batch=4", "--n_caption_eval=2", "--caption_tokens=40", "--n_vis=2",
                 "--max_train_seconds=0"],
    "lanelm": ["--n_layer=1", "--n_embd=32", "--n_head=2", "--conv_width=8", "--n_eval=4", "--n_eval_tf=4",
               "--eval_batch=4", "--n_vis=2", "--max_train_seconds=0"],
    "pointer": ["--img_size=32", "--patch_size=8", "--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--n_layer=1",
                "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--n_eval=8", "--n_eval_multi=4", "--n_train_eval=4",
                "--max_query_len=24", "--max_train_seconds=0",
                "--curriculum_steps=0", "--multi_weight=0.5"],  # multi-point queries from step 0: ranks differ in point count
}
STEPS = 4
# per-rank batch: 2, except OCR's 1 (its batch centring must count the global batch, not a rank's single image)
PER_RANK_BATCH = dict(ocr=1)


TEARDOWN_ABORT = "terminate called without an active exception"


def losses(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([-\d.]+)", r.stdout, re.M)]


def run_torchrun(script, args):
    """2 ranks under torchrun: real processes, the command line a user types."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0 and TEARDOWN_ABORT in r.stdout + r.stderr:
        # seen rarely (about 1 run in 10 on a loaded CPU, earlier; 0 in 60 launches on 2026-12-01 after the
        # scripts began dropping their DDP wrapper before cleanup_distributed(), 0 in 40 before): a gloo rank aborts
        # in C++ teardown AFTER training, eval and the checkpoint completed. Only that exact abort is retried, once.
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert TEARDOWN_WARNING not in r.stderr, r.stderr[-2000:]  # the script dropped its DDP wrapper in time
    return losses(r)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_equal_one(recipe, tmp_path):
    from safetensors.torch import load_file
    script, args = f"train_{recipe}.py", RECIPES[recipe]
    common = [*args, f"--max_steps={STEPS}", "--log_interval=1", "--eval_interval=1000"]
    per_rank = PER_RANK_BATCH.get(recipe, 2)
    two = run_torchrun(script, [*common, f"--batch_size={per_rank}", f"--out_dir={tmp_path / 'two'}"])
    # the 1-process reference runs inside this process (tests/inprocess.py): same script, one thread, no launcher
    one = losses(run_script(script, [*common, f"--batch_size={2 * per_rank}", f"--out_dir={tmp_path / 'one'}"],
                            env=dict(OMP_NUM_THREADS="1")))
    assert len(one) >= STEPS - 1 and len(two) == len(one), (one, two)  # rank 0 alone prints
    assert two == pytest.approx(one, rel=1e-4, abs=1e-4)
    a = load_file(str(tmp_path / "one" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
