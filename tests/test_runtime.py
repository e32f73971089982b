"""The run plumbing every script shares (runtime.py): setup, thread choice, the training clock, the Logger's
eval lines and files, wandb without a login, wrap and teardown."""
import json
import os

import pytest
import torch
import torch.nn as nn

import checkpoint as C
import model as M
import runtime as R


def config(tmp_path, **kw):
    return dict(dict(seed=3, device="cpu", dtype="auto", torch_threads=1, out_dir=str(tmp_path / "run"),
                     init_from="scratch", n_layer=2, width=8), **kw)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_setup_single_process(tmp_path):
    cfg = config(tmp_path)
    run = R.setup(cfg, "toy", ("n_layer",))
    assert (run.ddp, run.rank, run.world_size, run.master, run.device, run.dtype) == (False, 0, 1, True, "cpu", "float32")
    assert run.threads == torch.get_num_threads() == 1
    assert run.out_dir == cfg["out_dir"] and not run.resume and run.ckpt_src is None and run.meta == {}
    assert run.matmul_peak() > 0  # what the log line's MFU is against
    a = torch.rand(3)
    R.setup(cfg, "toy")
    assert torch.equal(torch.rand(3), a)  # seeded with seed + rank


def test_setup_adopts_a_checkpoints_model_keys_and_refuses_another_recipe(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    C.save_checkpoint(str(ckpt), nn.Linear(2, 2), meta=dict(recipe="toy", config=dict(n_layer=5, width=99)))
    cfg = config(tmp_path, init_from=str(ckpt))
    run = R.setup(cfg, "toy", ("n_layer",))
    assert cfg["n_layer"] == 5 and cfg["width"] == 8  # only the model keys follow the checkpoint
    assert "from checkpoint: n_layer=5 (config said 2)" in capsys.readouterr().out
    assert run.ckpt_src == str(ckpt) and run.meta["recipe"] == "toy"
    with pytest.raises(M.InputError, match="is a 'toy' checkpoint, not 'other'"):
        R.setup(config(tmp_path, init_from=str(ckpt)), "other")
    # resume reads <out_dir>/ckpt; an older checkpoint without the key is read through `absent`
    C.save_checkpoint(str(tmp_path / "run" / "ckpt"), nn.Linear(2, 2), meta=dict(recipe="toy", config={}))
    cfg = config(tmp_path, init_from="resume")
    run = R.setup(cfg, "toy", ("n_layer",), absent=lambda meta: dict(n_layer=7))
    assert run.resume and run.ckpt_src == os.path.join(cfg["out_dir"], "ckpt") and cfg["n_layer"] == 7


def test_setup_without_out_dir_claims_a_fresh_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = {R.setup(config(tmp_path, out_dir=""), "toy").out_dir for _ in range(2)}
    assert len(dirs) == 2 and all(d.startswith(os.path.join("out", "toy-")) and os.path.isdir(d) for d in dirs)


def test_pick_threads_divides_the_cores_among_local_processes_and_ignores_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert R.pick_threads(0) == 16 and R.pick_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert R.pick_threads(0) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert R.pick_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default per process
    assert R.pick_threads(0) == 1


def test_clock_counts_steps_only_and_caps_on_an_opt_in_budget(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(R.time, "perf_counter", lambda: now[0])
    clock = R.Clock(budget=0.0, seconds=5.0)  # a resumed run continues its seconds
    clock.start()
    now[0] += 2.0
    assert clock.stop() == 2.0 and clock.seconds == 7.0
    now[0] += 50.0  # eval / checkpoint time between steps is not counted
    clock.start()
    now[0] += 1.0
    clock.stop()
    assert clock.seconds == 8.0
    assert clock.lr_step(10, 100) == 10 and not clock.spent()  # no budget: the step decides, never the time
    capped = R.Clock(budget=16.0, seconds=8.0)
    assert capped.lr_step(10, 100) == 50 and not capped.spent()  # half the budget: half the schedule
    capped.seconds = 16.0
    assert capped.spent() and capped.lr_step(10, 100) == 100


def test_logger_eval_prints_targets_then_diagnostics_and_writes_every_metric(tmp_path, capsys):
    cfg = config(tmp_path)
    run = R.setup(cfg, "toy")
    logger = R.Logger(run, "toy", cfg)
    metrics = dict(acc=0.97, err=3.5, entropy=1.25, other=7.0)
    targets = {"acc": (">=", 0.95), "err": ("<", 3)}
    res = logger.eval(40, metrics, targets, diagnostics=("entropy",), note="wrote x.png", n_eval=9, params=11,
                      train_seconds=12.3456)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["eval step 40 | acc 0.97 (>= 0.95) | err 3.5 (< 3) | NOT met", "  entropy 1.25 | wrote x.png"]
    saved = json.load(open(os.path.join(run.out_dir, "results.json")))
    assert saved == res and saved["metrics"] == metrics and saved["met"] is False and saved["step"] == 40
    assert saved["n_eval"] == 9 and saved["params"] == 11 and saved["device"] == "cpu"
    assert saved["train_seconds"] == 12.3456
    logger.eval(80, dict(metrics, err=2.0), targets)
    records = [json.loads(l) for l in open(os.path.join(run.out_dir, "evals.jsonl"))]
    assert [(r["step"], r["met"], r["metrics"]["other"]) for r in records] == [(40, False, 7.0), (80, True, 7.0)]
    assert json.load(open(os.path.join(run.out_dir, "results.json")))["step"] == 80  # results.json: the latest
    R.teardown(logger)


def test_wandb_without_a_login_goes_offline_and_says_so(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert not R.wandb_logged_in()
    cfg = config(tmp_path)
    run = R.setup(cfg, "toy")
    logger = R.Logger(run, "toy", cfg, wandb_log=True, project="p", run_name="r")
    assert os.environ["WANDB_MODE"] == "offline"
    assert "wandb: no login found" in capsys.readouterr().out
    logger.log(dict(loss=1.0), 1)
    logger.finish()
    assert os.path.isdir(os.path.join(run.out_dir, "wandb"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert R.wandb_logged_in()


def test_wrap_compiles_then_wraps_and_unwrap_returns_the_module(tmp_path):
    run = R.setup(config(tmp_path), "toy")
    layer = nn.Linear(2, 2)
    assert R.wrap(layer, False, run) is layer  # one process, no compile: the module itself
    assert C.unwrap(R.wrap(layer, True, run)) is layer  # compile is CUDA-only today: still the module


def test_setup_checks_the_hub_repo_name_before_any_work(tmp_path):
    with pytest.raises(M.InputError, match="push_to_hub must look like 'owner/name'"):
        R.setup(config(tmp_path, push_to_hub="no-slash"), "toy")
    assert not os.path.exists(tmp_path / "run")
