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
from model import InputError
from test_model import tiny_gpt


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
    assert saved["git"] == logger.git  # the commit the run started from, however HEAD moves while it trains
    logger.git = "started-at"
    logger.eval(80, dict(metrics, err=2.0), targets)
    assert json.load(open(os.path.join(run.out_dir, "results.json")))["git"] == "started-at"
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


def test_get_lr_warmup_and_cosine():
    lr = 1.0
    assert R.get_lr(0, 100, lr, warmup_steps=10) == pytest.approx(0.1)
    assert R.get_lr(4, 100, lr, warmup_steps=10) == pytest.approx(0.5)
    assert R.get_lr(9, 100, lr, warmup_steps=10) == pytest.approx(1.0)
    assert R.get_lr(10, 100, lr, warmup_steps=10) == pytest.approx(1.0)
    assert R.get_lr(55, 100, lr, warmup_steps=10, min_lr_frac=0.1) == pytest.approx(0.55)  # half way
    assert R.get_lr(100, 100, lr, warmup_steps=10, min_lr_frac=0.1) == pytest.approx(0.1)
    assert R.get_lr(1000, 100, lr, warmup_steps=10, min_lr_frac=0.1) == pytest.approx(0.1)
    assert R.get_lr(0, 100, 3e-4) == pytest.approx(3e-4)  # no warmup
    lrs = [R.get_lr(s, 100, lr, warmup_steps=10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    R.set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def test_configure_optimizers_groups():
    m = nn.Sequential(tiny_gpt(), nn.LayerNorm(8), nn.Linear(8, 8))
    m[2].weight.requires_grad_(False)
    opt = R.configure_optimizers(m, 1e-3, weight_decay=0.1, betas=[0.9, 0.95])
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in m.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert len(no_decay["params"]) == 3  # LayerNorm weight + bias, Linear bias
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3


def test_orthogonalize_pushes_singular_values_to_one():
    g = torch.randn(3, 48, 16, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64)  # condition number 100
    u = R.orthogonalize(g)
    assert u.shape == g.shape
    sv = torch.linalg.svdvals(u)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv  # the quintic lands in ~[0.7, 1.2], not exactly 1
    # the same directions: u ~ U V^T of g's SVD
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    cos = (u * (U @ Vh)).sum((-2, -1)) / (u.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos
    assert torch.allclose(R.orthogonalize(g[1:2]), u[1:2], atol=1e-6)  # batched = one by one


def test_configure_optimizers_muon_splits_hidden_matrices():
    m = nn.Sequential(tiny_gpt(), nn.Linear(32, 1))  # the 1-unit head is not a hidden matrix
    opt = R.configure_optimizers(m, 1e-3, weight_decay=0.1, optimizer="muon")
    adamw, muon = opt.optimizers
    hidden = {id(p) for g in muon.param_groups for p in g["params"]}
    blocks = {id(p) for n, p in m.named_parameters() if ".h." in n and p.dim() == 2}
    assert hidden == blocks  # every attention / MLP matrix; not wte, lm_head or the head
    rest = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert sorted(rest + list(hidden)) == sorted(id(p) for p in m.parameters()) and len(set(rest)) == len(rest)
    R.set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for o in opt.optimizers for g in o.param_groups)
    with pytest.raises(M.InputError, match="adamw' or 'muon"):
        R.configure_optimizers(m, 1e-3, optimizer="sgd")


def test_autocast_compile_unwrap_and_finite_check():
    ctx, name = R.autocast_ctx("cpu")
    assert name == "float32"
    with ctx:
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    ctx, name = R.autocast_ctx("cpu", "bfloat16")
    with ctx:
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(InputError):
        R.autocast_ctx("cpu", "float16")
    m = tiny_gpt()
    assert R.maybe_compile(m, False, "cpu") is m
    compiled = R.maybe_compile(m, True, "cpu")  # compiled lazily, at its first call (tests/test_compile.py runs it)
    assert compiled is not m and C.unwrap(compiled) is m and C.unwrap(m) is m
    with pytest.raises(FloatingPointError, match="step 7"):
        R.check_finite(torch.tensor(float("nan")), 7)
    cfg = m.config
    n = m.num_params()
    assert M.gpt_flops_per_token(cfg, n) == 6 * n + 12 * 2 * 4 * 8 * 64
    assert m.num_params(exclude_embedding=True) == n - 64 * 32
    line = R.log_line(100, 2000, 0.512, 3e-4, 0.041, tokens=410, flops_per_step=1e9, peak=1e11)
    assert line.startswith("step 100/2000 | loss 0.5120 | lr 3.0e-04 | 41 ms | 10.0k tok/s | mfu ")


def test_resolve_device_without_a_gpu_is_one_clear_line(monkeypatch):
    # --device=cuda on a machine without a GPU: one clear line, not an assertion deep inside torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.InputError, match="device='cuda:1' but torch sees no CUDA GPU"):
        R.resolve_device("cuda:1")
    assert R.resolve_device("auto") == "cpu"


def test_budget_lr_step_follows_whichever_is_further_along():
    from runtime import budget_lr_step, budget_spent
    assert budget_lr_step(10, 100, 999.0, 0.0) == 10            # no budget: the step, exactly reproducible
    assert budget_lr_step(10, 100, 5.0, 100.0) == 10            # steps ahead of time
    assert budget_lr_step(10, 100, 50.0, 100.0) == 50           # time ahead: the LR decays on time
    assert budget_lr_step(10, 100, 500.0, 100.0) == 100         # never past the end of the schedule
    assert not budget_spent(99.0, 100.0) and budget_spent(100.0, 100.0) and not budget_spent(1e9, 0.0)
