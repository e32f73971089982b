"""Pointer and Seg-Gumbel from a pretrained LLM (init_gpt) and a pretrained vision encoder (vit_init).

The first logged loss of a run from a tiny random Llama (tied head, written by transformers' save_pretrained) equals
the loss the same run computes when every GPT call is answered by transformers' own LlamaModel instead (token table
with the recipe's specials appended as the mean row, hidden states, head): the reference never touches the loaded
GPT. A checkpoint of such a run evaluates to the same metrics (the tokenizer is rebuilt from the source its meta
names); Pointer's ViT from a tiny CLIP takes RGB alone; activation checkpointing leaves the losses unchanged."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import model
from data_seg import seg_synthetic_sample
from inprocess import run_script
from test_pretrained_gpt import write_llama
from test_recipes_ddp import RECIPES, losses

transformers = pytest.importorskip("transformers")  # the test requirements install it: CI runs these tests
tokenizers = pytest.importorskip("tokenizers")

ENV = dict(OMP_NUM_THREADS="1")
POINTER = ["--img_size=32", "--patch_size=8", "--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--n_eval=4",
           "--n_eval_multi=2", "--n_train_eval=2", "--n_vis=0", "--max_query_len=64", "--word_tokens=False",
           "--batch_size=3", "--log_interval=1", "--eval_interval=1000"]
SEG = ["--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--dec_dim=16", "--n_eval=4", "--eval_batch_size=4",
       "--n_vis=0", "--max_caption_len=24", "--batch_size=3", "--log_interval=1", "--eval_interval=1000"]
SPECIALS = dict(pointer=["<|point|>", "<|image|>", "<|pad|>"],
                seg_gumbel=["<|eos|>", "<|pad|>", "<|image|>", "[SEG]", "<vp>", "</vp>", "<mask>"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny tied-head Llama dir, its transformers model and its tokenizer with the recipes' specials appended."""
    d = tmp_path_factory.mktemp("llama")
    hf = write_llama(str(d), tied=True).eval()
    return str(d), hf


def recipe_tokenizer(src, recipe):
    tk = tokenizers.Tokenizer.from_file(f"{src}/tokenizer.json")
    tk.add_special_tokens([tokenizers.AddedToken(n, special=True, normalized=False) for n in SPECIALS[recipe]])
    return tk


def patch_gpt_with_transformers(monkeypatch, hf, new_ids, seen):
    """Every training-time GPT call answered by transformers' Llama: the token table (the appended specials' rows the
    mean of the model's rows), its decoder stack with the final norm, its tied head. seen: the first ids embedded."""
    table = hf.model.embed_tokens.weight.detach().clone()
    table[new_ids] = hf.model.embed_tokens.weight.detach().mean(0)
    own = model.GPT.forward_embeds, model.GPT.logits

    def embed(self, idx, vision_embeds=None):
        seen.setdefault("ids", idx.clone())
        x = F.embedding(idx, table)
        if vision_embeds is not None:
            rows = vision_embeds.reshape(-1, x.shape[-1]).to(x.dtype)
            x = x.masked_scatter((idx == self.config.image_token_id)[..., None], rows)
        return x

    def forward_embeds(self, x, pad_mask=None, kv_cache=None, block=None):
        if kv_cache is not None or block is not None:  # eval's decoding: not compared
            return own[0](self, x, pad_mask, kv_cache, block)
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        h = hf.model(inputs_embeds=x, attention_mask=mask.long(), position_ids=pos).last_hidden_state
        return torch.where(mask[..., None], h, torch.zeros_like(h))  # pad rows: read by nothing

    def logits(self, h, head=None):
        return own[1](self, h, head) if head is not None else (h @ table.T).float()

    monkeypatch.setattr(model.GPT, "embed", embed)
    monkeypatch.setattr(model.GPT, "forward_embeds", forward_embeds)
    monkeypatch.setattr(model.GPT, "logits", logits)


def first_loss_both_ways(script, args, llama, recipe, tmp_path, monkeypatch):
    """-> (the run's first logged loss, the reference's, the ids the reference embedded first, the run's stdout)."""
    src, hf = llama
    ours = run_script(script, [*args, f"--init_gpt={src}", f"--out_dir={tmp_path / 'ours'}"], env=ENV)
    tk = recipe_tokenizer(src, recipe)
    new_ids = [tk.token_to_id(n) for n in SPECIALS[recipe]]
    assert all(i is not None for i in new_ids)
    seen = {}
    with monkeypatch.context() as m:
        patch_gpt_with_transformers(m, hf, new_ids, seen)
        ref = run_script(script, [*args, f"--init_gpt={src}", f"--out_dir={tmp_path / 'ref'}"], env=ENV)
    return losses(ours)[0], losses(ref)[0], seen["ids"], ours.stdout


def test_pointer_first_loss_is_the_loaded_llms(llama, tmp_path, monkeypatch):
    ours, ref, ids, out = first_loss_both_ways("train_pointer.py", [*POINTER, "--max_steps=1"], llama, "pointer",
                                               tmp_path, monkeypatch)
    assert ours == pytest.approx(ref, rel=1e-4)
    # the shape comes from the source, each change printed; the query is the LLM's own tokens after its BOS
    assert "from checkpoint: n_embd=64 (config said 128)" in out and "from checkpoint: input_norm=False" in out
    tk = recipe_tokenizer(llama[0], "pointer")
    row = ids[0][ids[0] != tk.token_to_id("<|pad|>")].tolist()
    query = row[1:row.index(tk.token_to_id("<|image|>"))]
    assert row[0] == tk.token_to_id("<|begin_of_text|>") and len(query) >= 2
    assert tk.encode(tk.decode(query), add_special_tokens=False).ids == query


def test_seg_first_loss_is_the_loaded_llms(llama, tmp_path, monkeypatch):
    args = [*SEG, "--stage_a_steps=1", "--max_steps=1"]
    ours, ref, ids, out = first_loss_both_ways("train_seg_gumbel.py", args, llama, "seg_gumbel", tmp_path, monkeypatch)
    assert ours == pytest.approx(ref, rel=1e-4)  # mask loss + caption cross-entropy through the tied head
    assert "from checkpoint: n_layer=2 (config said 3)" in out
    tk = recipe_tokenizer(llama[0], "seg_gumbel")
    caption = seg_synthetic_sample(1337, "train", 0, 32)["caption"]  # the first sample of the captioned pool
    row = ids[0][ids[0] != tk.token_to_id("<|pad|>")].tolist()
    assert row == ([tk.token_to_id("<|begin_of_text|>")] + [tk.token_to_id("<|image|>")] * 16
                   + tk.encode(caption, add_special_tokens=False).ids + [tk.token_to_id("[SEG]")])


@pytest.mark.parametrize("recipe", ["pointer", "seg_gumbel"])
def test_a_checkpoint_of_an_llm_run_evaluates_the_same(llama, recipe, tmp_path):
    """eval_only from the checkpoint (the tokenizer rebuilt from the source its meta names, the weights read back)
    gives the run's own final metrics; the tied embedding trained (it is the head and the token table at once)."""
    src, hf = llama
    script, args = ("train_pointer.py", POINTER) if recipe == "pointer" else ("train_seg_gumbel.py", [*SEG, "--stage_a_steps=1"])
    run = run_script(script, [*args, "--max_steps=2", f"--init_gpt={src}", f"--out_dir={tmp_path / 'run'}"], env=ENV)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ckpt = tmp_path / "run" / "ckpt"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["gpt_source"] == src and meta["gpt"]["tie_embeddings"] and meta["specials"][-2:] == SPECIALS[recipe][-2:]
    final = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    again = run_script(script, [*args, "--eval_only=True", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'eval'}"],
                       env=ENV)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    keys = ("mean_px", "within_5px", "seq_recall_5px") if recipe == "pointer" else ("giou", "caption_acc", "cycle_iou")
    assert {k: metrics[k] for k in keys} == {k: final[k] for k in keys}
    wte = load_file(str(ckpt / "model.safetensors"))[("" if recipe == "pointer" else "student.") + "gpt.transformer.wte.weight"]
    assert not torch.equal(wte[:400], hf.model.embed_tokens.weight.detach()[:400])


def test_pointer_vit_init_reads_rgb_with_the_sources_patch_embedding(tmp_path):
    T = transformers
    hf = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=16, patch_size=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    hf.save_pretrained(str(tmp_path / "clip"))  # a 2 x 2 table, run at 32 px: 4 x 4 patches
    args = [*RECIPES["pointer"], "--max_steps=1", "--log_interval=1", "--eval_interval=1000", "--lr=0",
            f"--vit_init={tmp_path / 'clip'}", f"--out_dir={tmp_path / 'run'}"]
    bad = run_script("train_pointer.py", args, env=ENV)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: vit_init={tmp_path / 'clip'} is a pretrained encoder whose patch embedding reads RGB alone: set "
        "stem='patch', edge_channels=False and coord_channels=False"]
    r = run_script("train_pointer.py", [*args, "--edge_channels=False", "--coord_channels=False"], env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trained = load_file(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    from pretrained_vision import load_vision
    loaded = load_vision(str(tmp_path / "clip"))[0].state_dict()
    assert loaded["patch.weight"].shape[1] == 3  # RGB alone
    assert all(torch.equal(trained[f"vit.{k}"], v) for k, v in loaded.items())  # lr 0: the source's weights
    meta = json.loads((tmp_path / "run" / "ckpt" / "meta.json").read_text())
    assert meta["vit"]["in_chans"] == 3 and meta["vit"]["act"] == "quick_gelu" and not meta["coord_channels"]


@pytest.mark.parametrize("recipe", ["pointer", "seg_gumbel"])
def test_activation_checkpointing_leaves_the_losses(recipe, tmp_path):
    args = [*RECIPES[recipe], "--max_steps=3", "--log_interval=1", "--eval_interval=1000", "--batch_size=2"]
    args += ["--stage_a_steps=2"] if recipe == "seg_gumbel" else []  # both stages
    plain = losses(run_script(f"train_{recipe}.py", [*args, f"--out_dir={tmp_path / 'plain'}"], env=ENV))
    ckpt = losses(run_script(f"train_{recipe}.py", [*args, "--activation_checkpointing=True",
                                                   f"--out_dir={tmp_path / 'ckpt'}"], env=ENV))
    assert len(plain) == 3 and ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)
