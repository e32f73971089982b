"""
Recipes started from a pretrained LLM (init_gpt): OCR from a tiny nanochat dir, Foveated from a tiny Llama dir
(written by tests/test_pretrained_gpt.py's helpers). The LLM's weights, shape and tokenizer come from the source,
the recipe's special tokens are appended, and a resume or an eval rebuilds the same tokenizer from the checkpoint.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data_ocr
from checkpoint import load_checkpoint
from data import normalize
from inprocess import run_script
from pretrained import add_special_tokens, load_gpt
from test_pretrained_gpt import nanochat_reference, tiny_hf_tokenizer, write_llama, write_nanochat

pytest.importorskip("transformers")  # the tiny sources are written with it (the test requirements install it)

OCR = ["--image_size=32", "--sam_dim=16", "--sam_window=4", "--neck_dim=8", "--clip_layers=1", "--batch_size=2",
       "--n_eval=2", "--eval_batch=2", "--log_interval=1", "--max_text_tokens=16", "--bench_tokens=0",
       "--max_lines=1", "--font_sizes=(10,)", "--center_vision=False", "--max_train_seconds=0"]
FOVEATED = ["--device=cpu", "--n_frames=4", "--image_size=16", "--vit_layers=1", "--vit_width=32", "--query_dim=16",
            "--latent_channels=4", "--n_distractors=2", "--n_eval=2", "--eval_batch=2", "--n_caption_eval=2",
            "--n_vis=0", "--batch_size=2", "--log_interval=1", "--max_train_seconds=0"]


def run(script, args):
    r = run_script(script, args, env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def first_loss(log):
    return float(next(line for line in log.splitlines() if line.startswith("step 1/")).split("|")[1].split()[1])


def ocr_reference_loss(src, ckpt, config):
    """The loaded LLM's loss on the run's first batch, built here from the source alone: its tokenizer (BOS, the
    prompt, the page text), its weights with <|image|>, <|eos|>, <|pad|> appended; only the (random) encoder is the
    run's, read from a checkpoint written with lr=0."""
    gpt, tok, _ = load_gpt(src)
    image, eos, pad = add_special_tokens(gpt, tok, ["<|image|>", "<|eos|>", "<|pad|>"])
    gpt.config.image_token_id = image
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    run_model = data_ocr.model_from_meta(meta)
    load_checkpoint(ckpt, run_model)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    for k, v in gpt.state_dict().items():  # lr=0: the run's GPT is the loaded one, grown by three rows
        assert torch.equal(saved["gpt." + k], v), k
    enc = run_model.encoder.train()
    c = config
    samples = [data_ocr.ocr_synthetic_sample(c["seed"], "train", i, c["image_size"], tuple(c["font_sizes"]),
                                             c["max_lines"], c["noise"], paper=tuple(c["paper"]), ink=tuple(c["ink"]),
                                             pitch=c["pitch"], line_gap=c["line_gap"]) for i in range(c["batch_size"])]
    n_vision = data_ocr.vision_token_count(c["image_size"], c["sam_patch"])
    prompt = [tok.bos] + [image] * n_vision + tok.encode("\nFree OCR.")
    answers = [tok.encode(s["text"])[:c["max_text_tokens"]] + [eos] for s in samples]
    T = max(len(prompt) + len(a) for a in answers) - 1
    idx = torch.full((len(samples), T), pad)
    targets = torch.full((len(samples), T), -1)
    for i, a in enumerate(answers):
        seq = torch.tensor(prompt + a)
        idx[i, :len(seq) - 1] = seq[:-1]
        targets[i, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]
    images = normalize(torch.stack([s["image"] for s in samples]), enc.config.image_mean, enc.config.image_std)
    with torch.no_grad():
        _, loss_sum = gpt(idx, targets, vision_embeds=enc(images), loss_reduction="sum")
    return (loss_sum / (targets != -1).sum()).item()


def test_ocr_from_a_nanochat_dir_first_loss_is_the_loaded_models(tmp_path):
    src = write_nanochat(str(tmp_path / "nanochat"), nanochat_reference(n_head=4, n_kv_head=2))
    out = tmp_path / "run"
    log = run("train_ocr.py", [*OCR, f"--init_gpt={src}", "--n_head=8", "--max_steps=1", "--lr=0", f"--out_dir={out}"])
    for k, v in (("n_layer", 2), ("n_head", 4), ("n_kv_head", 2), ("n_embd", 64)):  # the source's shape, printed
        assert f"from checkpoint: {k}={v} " in log
    res = json.load(open(out / "results.json"))
    assert (res["config"]["n_layer"], res["config"]["n_embd"]) == (2, 64)
    want = ocr_reference_loss(src, str(out / "ckpt"), res["config"])
    assert first_loss(log) == pytest.approx(want, abs=1e-4)
    # the checkpoint names the tokenizer's source and the appended specials: a resume and an eval rebuild it
    meta = json.load(open(out / "ckpt" / "meta.json"))
    assert meta["gpt_source"] == src and meta["specials"] == ["<|image|>", "<|eos|>", "<|pad|>"]
    assert meta["gpt"]["qk_norm"] and meta["gpt"]["mlp"] == "relu2"
    run("train_ocr.py", [*OCR, "--init_from=resume", "--max_steps=2", "--lr=1e-3", f"--out_dir={out}"])
    assert json.load(open(out / "results.json"))["step"] == 2
    # (a config file's init_gpt never replaces a checkpoint's trained GPT)
    log = run("train_ocr.py", [*OCR, "--eval_only=True", f"--init_from={out / 'ckpt'}", f"--init_gpt={src}",
                               f"--out_dir={tmp_path / 'ev'}"])
    assert f"init_gpt={src} not loaded" in log and json.load(open(tmp_path / "ev" / "results.json"))["step"] == 2
    # load_gpt (sample.py) on the recipe's checkpoint: its GPT with the nanochat tokenizer and the recipe's specials
    gpt, tok, _ = load_gpt(str(out / "ckpt"))
    source_tok = load_gpt(src)[1]
    assert tok.vocab_size == gpt.config.vocab_size == source_tok.vocab_size + 3
    assert tok.encode("the quick fox") == source_tok.encode("the quick fox") and tok.bos == source_tok.bos


def test_ocr_init_gpt_must_fit_the_encoder_it_joins(tmp_path):
    src = write_nanochat(str(tmp_path / "nanochat"), nanochat_reference())
    stage1 = tmp_path / "s1"
    run("train_ocr.py", [*OCR, "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--max_steps=1",
                         f"--out_dir={stage1}"])
    r = run_script("train_ocr.py", [*OCR, "--stage=2", f"--init_encoder={stage1 / 'encoder'}", f"--init_gpt={src}",
                                    "--max_steps=1", f"--out_dir={tmp_path / 's2'}"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith("projects to 32 but the GPT has n_embd 64")


@pytest.mark.parametrize("bos", [True, False])
def test_foveated_from_a_llama_dir(tmp_path, bos):
    """A tied Llama (SwiGLU, GQA, rope theta 50000); a tokenizer without BOS gets the recipe's <|bos|>."""
    src = str(tmp_path / "llama")
    write_llama(src, tied=True)
    tiny_hf_tokenizer(os.path.join(src, "tokenizer.json"), bos=bos)
    out = tmp_path / "run"
    log = run("train_foveated.py", [*FOVEATED, f"--init_gpt={src}", "--max_steps=2", "--lr=0", f"--out_dir={out}"])
    assert "from checkpoint: n_embd=64 (config said 128)" in log and "from checkpoint: n_layer=2 " not in log
    meta = json.load(open(out / "ckpt" / "meta.json"))
    names = ["<|image|>", "<|eos|>", "<|pad|>"] + ([] if bos else ["<|bos|>"])
    assert meta["specials"] == names and meta["gpt"]["mlp"] == "swiglu" and meta["gpt"]["tie_embeddings"]
    gpt, tok, _ = load_gpt(src)
    add_special_tokens(gpt, tok, names)
    saved = load_file(str(out / "ckpt" / "model.safetensors"))
    for k, v in gpt.state_dict().items():  # lr=0: the loaded weights, the new rows the mean of the old ones
        assert torch.equal(saved["gpt." + k], v), k
    res = json.load(open(out / "results.json"))
    assert set(res["caption_example"]) == {"generated", "truth"}  # captions generated through the loaded tokenizer
    run("train_foveated.py", [*FOVEATED, "--init_from=resume", "--max_steps=3", f"--out_dir={out}"])
    assert json.load(open(out / "results.json"))["step"] == 3
