"""Hugging Face Hub round trip without the network: push_to_hub uploads into a fake Hub that writes the
same on-disk layout huggingface_hub's cache uses, and 'hf:owner/name' is then resolved from that cache
by the real snapshot_download with HF_HUB_OFFLINE=1."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import model as M
import runtime as R
import checkpoint as C
from inprocess import run_script  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: upload_folder writes a snapshot in the hub cache layout."""
    cache = None
    created = []

    def create_repo(self, repo_id, exist_ok=False):
        FakeHfApi.created.append(repo_id)

    def upload_folder(self, folder_path, repo_id, ignore_patterns=()):
        base = os.path.join(FakeHfApi.cache, "models--" + repo_id.replace("/", "--"))
        snap = os.path.join(base, "snapshots", "0" * 40)
        shutil.copytree(folder_path, snap, ignore=shutil.ignore_patterns(*ignore_patterns))
        os.makedirs(os.path.join(base, "refs"), exist_ok=True)
        with open(os.path.join(base, "refs", "main"), "w") as f:
            f.write("0" * 40)


def tiny_gpt():
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))


def test_push_then_load_from_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub
    FakeHfApi.cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    gpt = tiny_gpt()
    ckpt = str(tmp_path / "ckpt")
    opt = R.configure_optimizers(gpt, 1e-3)
    C.save_checkpoint(ckpt, gpt, opt, meta=dict(gpt=gpt.config.__dict__, step=7))
    C.push_to_hub(ckpt, "me/tiny-gpt", "lanelm", metrics={"tusimple_acc": 0.9}, config={"lr": 1e-3})

    snap = os.path.join(FakeHfApi.cache, "models--me--tiny-gpt", "snapshots", "0" * 40)
    assert FakeHfApi.created == ["me/tiny-gpt"]
    assert sorted(os.listdir(snap)) == ["README.md", "meta.json", "model.safetensors"]  # no optimizer state
    card = open(os.path.join(snap, "README.md")).read()
    assert "tusimple_acc: 0.9" in card and '"lr": 0.001' in card

    # a fresh process resolves hf:me/tiny-gpt through the real snapshot_download, offline
    code = ("import checkpoint as C, torch; g = C.gpt_from_pretrained('hf:me/tiny-gpt'); "
            "print(sum(float(p.double().sum()) for p in g.parameters()))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=FakeHfApi.cache, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    expected = sum(float(p.detach().double().sum()) for p in gpt.parameters())
    assert abs(float(out.stdout.strip()) - expected) < 1e-9


def test_missing_hf_repo_offline_is_a_clear_error(tmp_path):
    code = "import checkpoint as C; C.gpt_from_pretrained('hf:nobody/nothing')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    assert "nobody/nothing" in out.stderr


def test_model_card_without_metrics(tmp_path):
    C.write_model_card(str(tmp_path), "ocr")
    text = open(tmp_path / "README.md").read()
    assert "# ocr" in text and "(none recorded)" in text
    assert json.loads(text.split("```json")[1].split("```")[0]) == {}


def test_push_run_to_hub_card_carries_the_run_metrics(tmp_path, monkeypatch):
    import huggingface_hub
    FakeHfApi.cache, FakeHfApi.created = str(tmp_path / "hub"), []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    gpt = tiny_gpt()
    run = tmp_path / "run"
    C.save_checkpoint(str(run / "best"), gpt, R.configure_optimizers(gpt, 1e-3), meta=dict(gpt=gpt.config.__dict__))
    (run / "results.json").write_text(json.dumps({"metrics": {"px_mean": 2.5}}))
    C.push_run_to_hub("me/run", str(run), "pointer", {"seed": 1}, ckpt_name="best")
    card = open(os.path.join(FakeHfApi.cache, "models--me--run", "snapshots", "0" * 40, "README.md")).read()
    assert "px_mean: 2.5" in card and "train_pointer.py" in card


@pytest.mark.parametrize("recipe", ["lanelm", "pointer", "ocr", "seg_gumbel", "foveated"])
def test_bad_push_to_hub_fails_before_training(recipe, tmp_path):
    out = run_script(f"train_{recipe}.py", ["--push_to_hub=no-slash", f"--out_dir={tmp_path}/r"])
    assert out.returncode != 0
    assert "push_to_hub must look like 'owner/name'" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "r" / "ckpt")
