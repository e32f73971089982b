"""LaneLM from a pretrained LLM (init_gpt), activation checkpointing and the memory plan.

LaneLM's vocabulary is lane coordinates, so a loaded LLM gives its blocks and final norm only (the embedding and head
are the recipe's own, fresh). A tiny random Llama (written by transformers' save_pretrained) is loaded; the built
model's blocks are the source's bit for bit, and the first logged loss equals a reference computed apart from the
run: each lane as its own [IMAGE]*n_vis + lane sequence (not the run's packed rows), encoded here from the data
module, through transformers' own LlamaModel, then the run's fresh embedding and head. A checkpoint of such a run
rebuilds the same model for eval_only and resume."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import model
import pretrained
from data_lanelm import TUSIMPLE_W, LaneData, LaneTokenizer, lane_row_grid, lane_slots, lane_to_grid
from inprocess import run_script
from test_pretrained_gpt import write_llama
from test_recipes_ddp import RECIPES, losses

transformers = pytest.importorskip("transformers")  # the test requirements install it: CI runs these tests

ENV = dict(OMP_NUM_THREADS="1")
ARGS = ["--conv_width=8", "--batch_size=2", "--n_eval=2", "--n_eval_tf=2", "--eval_batch=2", "--n_vis=0",
        "--max_train_seconds=0", "--log_interval=1", "--eval_interval=1000"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny tied-head Llama dir (GQA, SwiGLU, norm gains, rope theta 50000) and its transformers model."""
    d = tmp_path_factory.mktemp("llama")
    return str(d), write_llama(str(d), tied=True).eval()


def lane_sequences(samples, tok, rows):
    """Each image's max_lanes token sequences [BOS_k ROW x dx ... EOS], lanes put on the row grid."""
    out = []
    for s in samples:
        slots, _ = lane_slots(s["lanes"], tok.max_lanes, centre=TUSIMPLE_W / 2)
        out.append([tok.encode(lane_to_grid(slots[k], s["h_samples"], rows) if slots[k] is not None
                               else [-2.0] * len(rows), k) for k in range(tok.max_lanes)])
    return out


def test_first_loss_is_the_loaded_blocks(llama, tmp_path, monkeypatch):
    src, hf = llama
    seen = {}
    own_embed = model.GPT.embed

    def embed(self, idx, vision_embeds=None):  # the first training batch's packed rows and vision tokens
        if torch.is_grad_enabled() and "idx" not in seen:
            seen.update(idx=idx.clone(), vision=vision_embeds.detach().clone())
        return own_embed(self, idx, vision_embeds)

    monkeypatch.setattr(model.GPT, "embed", embed)
    # lr 0: the checkpoint after one step holds the weights the first loss was computed with
    r = run_script("train_lanelm.py", [*ARGS, "--max_steps=1", "--lr=0", f"--init_gpt={src}",
                                       f"--out_dir={tmp_path / 'run'}"], env=ENV)
    monkeypatch.undo()
    ours = losses(r)[0]
    # the shape and the block architecture come from the source, each printed
    assert "from checkpoint: n_layer=2 (config said 4)" in r.stdout
    assert "from checkpoint: n_embd=64 (config said 128)" in r.stdout
    assert "n_kv_head=2, mlp='swiglu', intermediate_size=96, norm_gains=True, norm_eps=1e-05" in r.stdout

    weights = load_file(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    meta = json.loads((tmp_path / "run" / "ckpt" / "meta.json").read_text())
    source = pretrained.load_gpt(src)[0].state_dict()
    blocks = [k for k in source if not k.startswith(("transformer.wte.", "lm_head."))]
    assert len(blocks) == 2 * 8 + 1  # per block: 2 norms, q, k, v, proj, c_fc (gate|up), down; then ln_f
    assert all(torch.equal(weights[f"gpt.{k}"], source[k]) for k in blocks)
    layer = hf.model.layers[1]  # and as transformers holds them (the non-rotary ones need no conversion)
    assert torch.equal(weights["gpt.transformer.h.1.mlp.c_proj.weight"], layer.mlp.down_proj.weight)
    assert torch.equal(weights["gpt.transformer.h.1.ln_2.weight"], layer.post_attention_layernorm.weight)
    assert torch.equal(weights["gpt.transformer.ln_f.weight"], hf.model.norm.weight)
    wte, head = weights["gpt.transformer.wte.weight"], weights["gpt.lm_head.weight"]
    assert wte.shape == head.shape == (330, 64)  # the lane vocabulary, untied: the recipe's own rows
    assert meta["gpt_source"] == src and not meta["gpt"]["tie_embeddings"]

    # the reference: the first batch's lanes encoded here, each as its own sequence through transformers' Llama
    rows = lane_row_grid(20)
    tok = LaneTokenizer("relative_disjoint", 200, 32, max_rows=56, max_lanes=4, label_w=TUSIMPLE_W)
    data = LaneData("synthetic", 1337, 160, 96, rows, 4, "", "", "", False, max_cars=2, max_shadows=1, noise=0.02,
                    lighting=0.5, dash_freq=0.6, tilt=1.0)
    images = lane_sequences([data.get("train", i) for i in range(2)], tok, rows)
    vision, n_vis = seen["vision"], seen["vision"].shape[1]
    for b, lanes in enumerate(images):  # the run packed these very sequences after the image
        row = seen["idx"][b]
        assert row[n_vis:n_vis + sum(map(len, lanes))].tolist() == sum(lanes, [])
    cap = meta["gpt"]["logit_softcap"]
    assert cap == 15.0  # the recipe's head, not the source's
    total, count = 0.0, 0
    with torch.no_grad():
        for b, lanes in enumerate(images):
            for seq in lanes:
                x = torch.cat([vision[b], wte[seq]])[None]
                h = hf.model(inputs_embeds=x).last_hidden_state[0, n_vis:n_vis + len(seq) - 1]
                logits = cap * torch.tanh(h @ head.T / cap)
                total += F.cross_entropy(logits, torch.tensor(seq[1:]), reduction="sum").item()
                count += len(seq) - 1
    assert ours == pytest.approx(total / count, abs=1e-4)


def test_a_checkpoint_of_an_llm_run_rebuilds_it(llama, tmp_path):
    """eval_only from the checkpoint gives the run's own final metrics (the teacher-forced loss too: the same
    weights in the same architecture), and a resume continues from it."""
    src, _ = llama
    run = run_script("train_lanelm.py", [*ARGS, "--max_steps=2", f"--init_gpt={src}", f"--out_dir={tmp_path / 'run'}"],
                     env=ENV)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    final = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    ckpt = tmp_path / "run" / "ckpt"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["gpt"]["mlp"], meta["gpt"]["n_kv_head"], meta["gpt"]["rope_base"]) == ("swiglu", 2, 50000.0)
    again = run_script("train_lanelm.py", [*ARGS, "--eval_only=True", f"--init_from={ckpt}",
                                           f"--out_dir={tmp_path / 'eval'}"], env=ENV)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    metrics.pop("train_loss", None), final.pop("train_loss")  # (a training statistic, not the model's)
    assert metrics == final
    resumed = run_script("train_lanelm.py", [*ARGS, "--max_steps=3", "--init_from=resume",
                                             f"--out_dir={tmp_path / 'run'}"], env=ENV)
    assert len(losses(resumed)) == 1 and "step 3/3" in resumed.stdout


def test_activation_checkpointing_leaves_the_losses(tmp_path):
    args = [*RECIPES["lanelm"], "--max_steps=3", "--log_interval=1", "--eval_interval=1000", "--batch_size=2"]
    plain = losses(run_script("train_lanelm.py", [*args, f"--out_dir={tmp_path / 'plain'}"], env=ENV))
    ckpt = losses(run_script("train_lanelm.py", [*args, "--activation_checkpointing=True",
                                                 f"--out_dir={tmp_path / 'ckpt'}"], env=ENV))
    assert len(plain) == 3 and ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_the_memory_plan(tmp_path):
    r = run_script("train_lanelm.py", [*RECIPES["lanelm"], "--plan=True", "--plan_gpu_gib=0.015", "--batch_size=8",
                                       "--max_steps=50", "--log_interval=1", f"--out_dir={tmp_path}"], env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("memory plan per process"))
    assert [line.split()[0] for line in lines[head + 1:head + 7]] == [
        "parameters", "gradients", "optimizer", "activations", "activations,", "eval"]
    mib = [float(re.search(r"([\d.]+) MiB", lines[head + i]).group(1)) for i in (4, 5)]
    assert 0 < mib[1] < mib[0]  # the GPT blocks' activations recomputed: fewer saved
    # a 15 MiB "GPU" holds less than the batch of 8: the plan splits it into micro-batches that cover it
    micro, accum = map(int, re.search(r"micro-batch (\d+) x (\d+) accumulation steps", lines[head + 4]).groups())
    assert accum >= 2 and micro * accum >= 8 and micro * (accum - 1) < 8
    assert not [line for line in lines if line.startswith("step 3/")]  # two traced steps, then it stopped
