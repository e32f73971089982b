"""speedrun.sh end to end on tiny shapes: a recipe, bench.py, and report.md with the recipe's row; a failing
recipe stops the run with a non-zero exit that names it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG_TINY = ("--vit_layers=1 --vit_embd=32 --vit_heads=2 --n_layer=1 --n_embd=32 --n_head=2 --n_kv_head=2 "
            "--dec_dim=16 --n_eval=4 --eval_batch_size=4 --n_vis=2 --max_caption_len=8 --stage_a_steps=3 "
            "--max_steps=4 --batch_size=4 --log_interval=1")
BENCH_TINY = ("--n_layer=1 --n_embd=32 --n_head=2 --n_kv_head=1 --vocab_size=64 --seq_len=16 --batch_size=2 "
              "--rounds=1 --gen_rounds=1 --gen_tokens=8 --peak_seconds=0.05 --matmul_n=64")


def speedrun(tmp_path, extra_args):
    env = dict(os.environ, RECIPES="seg_gumbel", EXTRA_ARGS=extra_args, BENCH_ARGS=BENCH_TINY, SKIP_TESTS="1",
               SKIP_INSTALL="1", NO_VENV="1", RUN_ROOT=str(tmp_path / "runs"), REPORT=str(tmp_path / "report.md"),
               OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", "speedrun.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_speedrun_writes_a_report_row_per_recipe(tmp_path):
    r = speedrun(tmp_path, SEG_TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = open(tmp_path / "report.md").read()
    row = next(line for line in report.splitlines() if line.startswith("| seg_gumbel |"))
    assert "giou **" in row and "(>= 0.85)" in row and "k tok/s" not in row
    assert row.split("|")[-2].strip() != "-"  # a measured training tok/s
    assert row.split("|")[4].strip() == "4"    # the step the results are at
    assert "## bench.py" in report and "train tok/s" in report


def test_speedrun_stops_and_names_a_failing_recipe(tmp_path):
    r = speedrun(tmp_path, SEG_TINY + " --no_such_key=1")
    assert r.returncode != 0
    assert "recipe 'seg_gumbel' failed" in r.stdout
    assert not (tmp_path / "report.md").exists()
