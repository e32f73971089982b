"""Checkpoints (checkpoint.py): atomic save and load, bit-exact round trips, interrupted writes, corrupted files,
exact resume, RNG states, from_pretrained (local and hf:), run dirs."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import checkpoint as C
import data
import model as M
import runtime as R
from model import GPT, GPTConfig, InputError
from test_model import tiny_gpt


def train_steps(m, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 64, (2, 9), generator=g)
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def trained(seed=0):
    m = tiny_gpt(seed).train()
    opt = R.configure_optimizers(m, 1e-3)
    train_steps(m, opt, 2, seed)
    return m, opt


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optim(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][k]), torch.as_tensor(sb["state"][i][k])), (i, k)


def test_checkpoint_round_trip_is_bit_exact_without_compile_prefixes(tmp_path):
    from safetensors import safe_open
    m, opt = trained()
    ckpt = tmp_path / "ckpt"
    compiled = torch.compile(m)  # only wrapped (never run): its state_dict has '_orig_mod.' prefixes
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    C.save_checkpoint(str(ckpt), compiled, opt, meta=dict(step=2, gpt=asdict(m.config)))
    assert sorted(os.listdir(ckpt)) == ["meta.json", "model.safetensors", "optim.pt"]
    assert not os.path.exists(str(ckpt) + ".tmp") and not os.path.exists(str(ckpt) + ".prev")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)

    m2 = tiny_gpt(seed=1).train()
    opt2 = R.configure_optimizers(m2, 1e-3)
    meta = C.load_checkpoint(str(ckpt), m2, opt2)
    assert meta["step"] == 2 and meta["gpt"]["n_kv_head"] == 2
    assert_same_state(m, m2)
    assert_same_optim(opt, opt2)
    # and training continues identically
    train_steps(m, opt, 1, seed=9)
    train_steps(m2, opt2, 1, seed=9)
    assert_same_state(m, m2)


def test_checkpoint_interrupted_write_keeps_previous_readable(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    m1, opt1 = trained(0)
    C.save_checkpoint(ckpt, m1, opt1, meta=dict(step=1))
    m2, opt2 = trained(1)

    # 1) the process dies while writing the new checkpoint's files (here: the optimizer state)
    def die(*a, **k):
        raise KeyboardInterrupt("killed")
    with monkeypatch.context() as mp:
        mp.setattr(M.torch, "save", die)
        with pytest.raises(KeyboardInterrupt):
            C.save_checkpoint(ckpt, m2, opt2, meta=dict(step=2))
    assert os.path.isdir(ckpt + ".tmp")  # the half-written one is left aside
    probe = tiny_gpt(5)
    assert C.load_checkpoint(ckpt, probe)["step"] == 1
    assert_same_state(probe, m1)

    # 2) the process dies between the two renames (old moved to .prev, new not yet in place)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)
    with monkeypatch.context() as mp:
        mp.setattr(C.os, "replace", replace_then_die)
        with pytest.raises(KeyboardInterrupt):
            C.save_checkpoint(ckpt, m2, opt2, meta=dict(step=2))
    assert not os.path.exists(ckpt) and os.path.isdir(ckpt + ".prev")
    probe, probe_opt = tiny_gpt(5).train(), None
    probe_opt = R.configure_optimizers(probe, 1e-3)
    assert C.load_checkpoint(ckpt, probe, probe_opt)["step"] == 1
    assert_same_state(probe, m1)
    assert_same_optim(probe_opt, opt1)

    # 3) the next save recovers: the new checkpoint is in place and the leftovers are gone
    C.save_checkpoint(ckpt, m2, opt2, meta=dict(step=2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    probe = tiny_gpt(5)
    assert C.load_checkpoint(ckpt, probe)["step"] == 2
    assert_same_state(probe, m2)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupted_weights_give_input_error(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    m, opt = trained()
    C.save_checkpoint(str(ckpt), m, opt, meta=dict(step=2))
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x13\x37" * 100)
    elif damage == "truncate":
        path.write_bytes(raw[:len(raw) // 2])
    else:
        path.write_bytes(b"")
    damaged = path.read_bytes()
    with pytest.raises(InputError) as e:
        C.load_checkpoint(str(ckpt), tiny_gpt())
    msg = str(e.value)
    assert "model.safetensors" in msg and "corrupt" in msg and "\n" not in msg
    assert path.read_bytes() == damaged  # nothing overwritten


def test_corrupted_optimizer_state_gives_input_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    m, opt = trained()
    C.save_checkpoint(str(ckpt), m, opt, meta=dict(step=2))
    raw = (ckpt / "optim.pt").read_bytes()
    (ckpt / "optim.pt").write_bytes(raw[:len(raw) // 3])
    m2 = tiny_gpt()
    with pytest.raises(InputError, match="optim.pt.*corrupt"):
        C.load_checkpoint(str(ckpt), m2, R.configure_optimizers(m2, 1e-3))


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load_checkpoint(str(tmp_path / "nope"), tiny_gpt())
    ckpt = str(tmp_path / "ckpt")
    m, opt = trained()
    C.save_checkpoint(ckpt, m, None, meta=dict(gpt=asdict(m.config)))
    with pytest.raises(FileNotFoundError, match="optim.pt"):
        C.load_checkpoint(ckpt, tiny_gpt(), R.configure_optimizers(tiny_gpt(), 1e-3))
    # a checkpoint of another shape: one clear InputError, not a state_dict traceback
    with pytest.raises(InputError, match="does not match"):
        C.load_checkpoint(ckpt, tiny_gpt(n_embd=64))
    with pytest.raises(InputError, match="does not match"):
        C.load_checkpoint(ckpt, tiny_gpt(n_layer=3))
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(InputError, match="meta"):
        C.load_checkpoint(ckpt, tiny_gpt())


def test_resume_continues_with_identical_losses(tmp_path):
    """6 steps straight == 3 steps, save, rebuild everything from the checkpoint, 3 more steps. The step
    uses the global RNG (random target masking), so restoring RNG state matters, and batches come from
    data.sample_rng(seed, 'train', index) with index a function of the step."""
    seed, B, T = 1234, 2, 12

    def batch(step):
        rows = [data.sample_rng(seed, "train", i).integers(0, 64, T + 1) for i in data.batch_indices(step, B)]
        return torch.as_tensor(np.stack(rows), dtype=torch.long)

    def step_fn(m, opt, step):
        idx = batch(step)
        tgt = idx[:, 1:].clone()
        tgt[torch.rand(tgt.shape) < 0.2] = -1  # global-RNG randomness inside the step
        R.set_lr(opt, R.get_lr(step, 6, 1e-2, warmup_steps=2))
        _, loss = m(idx[:, :-1], tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def fresh(init_seed):
        m = tiny_gpt(init_seed).train()
        return m, R.configure_optimizers(m, 1e-2)

    torch.manual_seed(0)
    m, opt = fresh(0)
    straight = [step_fn(m, opt, s) for s in range(6)]

    torch.manual_seed(0)
    m, opt = fresh(0)
    first = [step_fn(m, opt, s) for s in range(3)]
    C.save_checkpoint(str(tmp_path / "ckpt"), m, opt, meta=dict(step=3, rng=C.rng_state(), gpt=asdict(m.config)))
    del m, opt
    torch.manual_seed(999)  # a "fresh process": different RNG, different init, until restored
    np.random.seed(999)
    m2, opt2 = fresh(7)
    meta = C.load_checkpoint(str(tmp_path / "ckpt"), m2, opt2)
    meta = json.loads(json.dumps(meta))
    C.set_rng_state(meta["rng"])
    rest = [step_fn(m2, opt2, s) for s in range(meta["step"], 6)]
    assert first + rest == straight
    assert len(set(straight)) == 6


def test_rng_state_round_trip_through_json():
    import random
    state = json.loads(json.dumps(C.rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    C.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_from_pretrained_local_dir_and_hf(tmp_path, monkeypatch):
    m = tiny_gpt(3, n_kv_head=1)
    ckpt = str(tmp_path / "pretrained")
    C.save_checkpoint(ckpt, m, meta=dict(gpt=asdict(m.config), note="x"))
    idx = torch.tensor([[5, 6, 7]])
    ref, _ = m(idx)

    loaded = C.gpt_from_pretrained(ckpt)
    assert loaded.config == m.config
    assert_same_state(loaded, m)
    assert torch.equal(loaded.eval()(idx)[0], ref)

    built, meta = C.from_pretrained(ckpt, lambda meta: GPT(C.dataclass_from_dict(GPTConfig, meta["gpt"])))
    assert meta["note"] == "x"
    assert_same_state(built, m)

    import huggingface_hub
    asked = []

    def fake_snapshot_download(repo_id, **kw):
        asked.append(repo_id)
        return ckpt
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub = C.gpt_from_pretrained("hf:owner/name")
    assert asked and set(asked) == {"owner/name"}
    assert_same_state(hub, m)
    assert C.resolve_checkpoint("hf:owner/name") == ckpt

    with pytest.raises(FileNotFoundError):
        C.gpt_from_pretrained(str(tmp_path / "missing"))


def test_dataclass_from_dict_ignores_unknown_keys():
    cfg = C.dataclass_from_dict(GPTConfig, dict(n_layer=3, extra="x"))
    assert cfg.n_layer == 3 and cfg == GPTConfig(n_layer=3)


def test_run_dir_is_unique_and_resume_finds_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no out/x-\\*/ckpt to resume"):
        C.run_dir("", "x", "resume")
    a, b = C.run_dir("", "x"), C.run_dir("", "x")  # the same second, most likely: two dirs, never one
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
    assert C.run_dir("given", "x") == "given"
    C.save_checkpoint(os.path.join(a, "ckpt"), tiny_gpt(), meta=dict(step=1))
    assert C.run_dir("", "x", "resume") == a  # b has no checkpoint
    C.save_checkpoint(os.path.join(b, "ckpt"), tiny_gpt(), meta=dict(step=1))
    assert C.run_dir("", "x", "resume") == max(a, b)


def test_gpt_from_pretrained_names_a_checkpoint_without_a_gpt(tmp_path):
    C.save_checkpoint(str(tmp_path / "ckpt"), tiny_gpt(), meta=dict(recipe="pointer"))
    with pytest.raises(M.InputError, match="is not a GPT checkpoint.*'pointer'"):
        C.gpt_from_pretrained(str(tmp_path / "ckpt"))


def test_muon_trains_and_resumes_exactly(tmp_path):
    m = tiny_gpt(0).train()
    opt = R.configure_optimizers(m, 3e-3, optimizer="muon")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (4, 9), generator=g)
    first = m(idx[:, :-1], idx[:, 1:])[1].item()
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        m(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
    assert m(idx[:, :-1], idx[:, 1:])[1].item() < first - 0.5  # it learns (a fixed batch)
    C.save_checkpoint(str(tmp_path / "ckpt"), m, opt, meta=dict(step=20))
    m2 = tiny_gpt(1).train()
    opt2 = R.configure_optimizers(m2, 3e-3, optimizer="muon")
    C.load_checkpoint(str(tmp_path / "ckpt"), m2, opt2)
    for a, b in zip(opt.optimizers, opt2.optimizers):
        assert_same_optim(a, b)
    for o in (opt, opt2):  # the LR schedule must still reach both inner optimizers after load_state_dict
        R.set_lr(o, 1e-4)
        assert [g["lr"] for inner in o.optimizers for g in inner.param_groups] == [1e-4] * len(o.param_groups)
    train_steps(m, opt, 2, seed=9)
    train_steps(m2, opt2, 2, seed=9)
    assert_same_state(m, m2)
    # an AdamW run's checkpoint cannot resume a Muon run (and the other way): one clear error
    C.save_checkpoint(str(tmp_path / "adamw"), *trained(), meta=dict(step=2))
    with pytest.raises(M.InputError, match="is AdamW's, this run uses AdamW \\+ Muon"):
        C.load_checkpoint(str(tmp_path / "adamw"), m2, opt2)
    with pytest.raises(M.InputError, match="is AdamW \\+ Muon's, this run uses AdamW "):
        C.load_checkpoint(str(tmp_path / "ckpt"), m2, R.configure_optimizers(m2, 1e-3))
