"""
pretrained.load_gpt against transformers, offline: tiny random models built with transformers (every parameter
re-randomised, so a swapped norm, a missing gain or a wrong rotary convention shows), written in each source's
own file layout, loaded through load_gpt, compared in fp32 (logits, left padding, greedy continuations with our
KV cache); tokenizers against their references on 1,000 strings; bad input refused in one line; sample.py.
"""
import json
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

import pretrained
from checkpoint import save_checkpoint
from dataclasses import asdict
from model import GPT, GPTConfig, InputError, left_pad, rotary_table
from pretrained import add_special_tokens, load_gpt

transformers = pytest.importorskip("transformers")  # the test requirements install it: CI runs these tests
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ng", b"ing", b"er", b"an", b" a", b"on", b"es", b"  ",
          b"    ", b"\n\n", b"\xc3\xa9", b"re", b"at", b"ou"]


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tiny_encoding():
    """A small BPE in tiktoken's format, as nanochat pickles it: 256 byte ranks, merges, then its specials."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(NANOCHAT_SPECIALS)}
    pat = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def write_nanochat(d, hf_model, step=650, pad_to=64, protocol=pickle.DEFAULT_PROTOCOL, tokenizer_dir=None):
    """hf_model (NanoChatForCausalLM) in nanochat's own layout: model_<step>.pt (torch.compile's '_orig_mod.'
    prefix, bf16 embedding, vocab padded to a multiple of 64) + meta_<step>.json + tokenizer.pkl."""
    c = hf_model.config
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    pad = -(-c.vocab_size // pad_to) * pad_to - c.vocab_size
    state = {"transformer.wte.weight": torch.cat([sd["model.embed_tokens.weight"], torch.randn(pad, c.hidden_size)]).bfloat16(),
             "lm_head.weight": torch.cat([sd["lm_head.weight"], torch.randn(pad, c.hidden_size)])}
    for i in range(c.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        for a, b in [("self_attn.q_proj", "attn.c_q"), ("self_attn.k_proj", "attn.c_k"), ("self_attn.v_proj", "attn.c_v"),
                     ("self_attn.o_proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            state[ours + b + ".weight"] = sd[hf + a + ".weight"]
    os.makedirs(d, exist_ok=True)
    torch.save({"_orig_mod." + k: v for k, v in state.items()}, os.path.join(d, f"model_{step:06d}.pt"))
    meta = dict(step=step, val_bpb=1.0, model_config=dict(sequence_len=64, vocab_size=c.vocab_size,
                n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads,
                n_embd=c.hidden_size), user_config={})
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta, f)
    tok_dir = tokenizer_dir or d
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tiny_encoding(), f, protocol=protocol)
    return d


def nanochat_reference(seed=0, n_head=4, n_kv_head=2, vocab=None):
    """A tiny NanoChatForCausalLM as classic nanochat computes: F.rms_norm's default epsilon, rope base 10000."""
    vocab = vocab or tiny_encoding().n_vocab
    c = transformers.NanoChatConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                                    rms_norm_eps=torch.finfo(torch.float32).eps, max_position_embeddings=256)
    m = randomise(transformers.NanoChatForCausalLM(c), seed).eval()
    with torch.no_grad():  # the bf16 embedding nanochat saves, as the reference's own weights
        m.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight.bfloat16().float())
    return m


def tiny_hf_tokenizer(path, bos=True, vocab_size=400):
    """A byte-level BPE tokenizer.json trained by the tokenizers library, BOS added by its post-processor."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld ünïcode 你好世界", "  indented\n\tcode()"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.save(path)
    return tk


def write_llama(d, tied, seed=0, shard=False, old_spelling=False, **overrides):
    """A tiny LlamaForCausalLM (GQA, rope_theta != 10000, intermediate_size not 4x, eps 1e-5) by save_pretrained,
    with a tokenizer.json. old_spelling rewrites config.json as most Hub checkpoints have it (rope_theta,
    torch_dtype)."""
    c = transformers.LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                                 rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tied,
                                 bos_token_id=0, eos_token_id=1, **overrides)
    m = randomise(transformers.LlamaForCausalLM(c), seed).eval()
    m.save_pretrained(d, max_shard_size="60KB" if shard else "5GB")
    tiny_hf_tokenizer(os.path.join(d, "tokenizer.json"))
    if old_spelling:
        path = os.path.join(d, "config.json")
        cfg = json.load(open(path))
        rope = cfg.pop("rope_parameters")
        cfg.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype=cfg.pop("dtype", "float32"))
        json.dump(cfg, open(path, "w"))
    return m


def hf_logits(ref, idx, mask=None):
    pos = None if mask is None else (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=idx, attention_mask=None if mask is None else mask.long(), position_ids=pos).logits


def assert_same_model(ref, ours, vocab, seed=0):
    """fp32 logits within 1e-4 on a random batch and a left-padded one; greedy 32-token continuations equal."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (3, 24), generator=g)
    with torch.no_grad():
        got = ours(idx)[0]
    want = hf_logits(ref, idx)
    assert (got - want).abs().max().item() < 1e-4
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 4, 7)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        got = ours(ids, pad_mask=mask)[0]
    want = hf_logits(ref, ids, mask)
    assert (got - want)[mask].abs().max().item() < 1e-4
    ref.generation_config.eos_token_id = None  # 32 tokens, no early stop
    want = ref.generate(ids, attention_mask=mask.long(), max_new_tokens=32, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, 32, pad_mask=mask)
    assert torch.equal(got, want)


# -----------------------------------------------------------------------------
# nanochat


@pytest.mark.parametrize("layout", ["flat", "tree"])
def test_nanochat_matches_transformers(tmp_path, layout):
    ref = nanochat_reference()
    if layout == "flat":  # as re-uploaded Hub repos hold it
        src = write_nanochat(str(tmp_path), ref)
    else:  # nanochat's base dir: base_checkpoints/d2/ and tokenizer/
        write_nanochat(str(tmp_path / "base_checkpoints" / "d2"), ref, tokenizer_dir=str(tmp_path / "tokenizer"))
        src = str(tmp_path)
    model, tok, meta = load_gpt(src)
    assert meta["format"] == "nanochat" and meta["step"] == 650
    c = model.config
    assert (c.n_head, c.n_kv_head, c.vocab_size, c.rope_base, c.norm_eps) == (4, 2, ref.config.vocab_size, 10000.0, None)
    assert tok.vocab_size == ref.config.vocab_size and tok.bos == tok["<|bos|>"]
    assert_same_model(ref, model, c.vocab_size)


def test_nanochat_heads_come_from_the_meta(tmp_path):
    """Same tensor shapes at 2 or 4 heads of 64 / 32 wide: only the meta's n_head gives the right model."""
    ref = nanochat_reference(n_head=2, n_kv_head=2)
    model, _, _ = load_gpt(write_nanochat(str(tmp_path), ref))
    assert model.config.n_head == 2
    assert_same_model(ref, model, model.config.vocab_size)


def test_nanochat_newest_step_unless_named(tmp_path):
    write_nanochat(str(tmp_path), nanochat_reference(seed=1), step=100)
    write_nanochat(str(tmp_path), nanochat_reference(seed=2), step=2000)
    newest, _, meta = load_gpt(str(tmp_path))
    older, _, meta_old = load_gpt(str(tmp_path), step=100)
    assert (meta["step"], meta_old["step"]) == (2000, 100)
    assert not torch.equal(newest.lm_head.weight, older.lm_head.weight)
    with pytest.raises(InputError, match="step 7"):
        load_gpt(str(tmp_path), step=7)


def random_strings(n=1000, seed=0, specials=()):
    rng = random.Random(seed)
    pieces = ["the", " quick", "brown", " fox", "héllo", "wörld", "你好", "世界", "🙂", "👍🏽", "e\u0301", "ß", "ﬁ",
              "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "123", "4567", "3.14", "(", ")", "!?", "'s", "'ll",
              "don't", "<", "|", ">", "\x00", "\u200b", "Ω≈ç√", "naïve café"] + list(specials)
    return [("".join(rng.choice(pieces) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(0, 12))))
            for _ in range(n)]


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_nanochat_tokenizer_equals_tiktoken(tmp_path, protocol):
    enc = tiny_encoding()
    path = tmp_path / "tokenizer.pkl"
    with open(path, "wb") as f:
        pickle.dump(enc, f, protocol=protocol)
    tok = pretrained.read_tiktoken_pickle(str(path))
    for s in random_strings(specials=NANOCHAT_SPECIALS):
        ids = tok.encode(s)
        assert ids == enc.encode_ordinary(s)  # special-token text stays text
        assert tok.decode(ids) == enc.decode(ids)
    ids = [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary("the café") + [tok["<|assistant_end|>"]]
    assert tok.decode(ids, skip_special=False) == enc.decode(ids)
    assert tok.decode(ids) == "the café"


def test_nanochat_tokenizer_pickle_is_restricted(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match="only a tiktoken Encoding"):
        pretrained.read_tiktoken_pickle(str(path))


# -----------------------------------------------------------------------------
# the Llama family


@pytest.mark.parametrize("tied,shard,old_spelling", [(False, False, False), (True, False, True), (False, True, True)])
def test_llama_matches_transformers(tmp_path, tied, shard, old_spelling):
    ref = write_llama(str(tmp_path), tied=tied, shard=shard, old_spelling=old_spelling)
    assert shard == os.path.exists(tmp_path / "model.safetensors.index.json")
    assert tied == ("lm_head.weight" not in ref.state_dict() or ref.lm_head.weight is ref.model.embed_tokens.weight)
    model, tok, meta = load_gpt(str(tmp_path))
    c = model.config
    assert meta["format"] == "transformers" and meta["model_type"] == "llama"
    assert (c.rope_base, c.norm_eps, c.intermediate_size, c.n_kv_head, c.tie_embeddings) == (50000.0, 1e-5, 96, 2, tied)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert_same_model(ref, model, c.vocab_size, seed=1)


@pytest.mark.parametrize("old_spelling", [False, True])
def test_llama3_rope_scaling_matches_transformers(tmp_path, old_spelling):
    """Llama 3.x (e.g. Llama-3.2-1B): rope_type 'llama3'. head_dim 16 over an original context of 64 puts the 8
    frequencies in all three bands (kept, blended, divided by the factor)."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    ref = write_llama(str(tmp_path), tied=True, old_spelling=old_spelling,
                      rope_parameters=dict(rope_theta=500000.0, **scaling))
    if old_spelling:  # the Hub's spelling: rope_theta beside a rope_scaling dict
        path = tmp_path / "config.json"
        cfg = json.load(open(path))
        json.dump(dict(cfg, rope_scaling=scaling), open(path, "w"))
    model, _, _ = load_gpt(str(tmp_path))
    assert model.config.rope_llama3 == (8.0, 1.0, 4.0, 64.0) and model.config.rope_base == 500000.0
    plain = rotary_table(64, 16, 500000.0)[0]
    assert not torch.allclose(model.cos[:64], plain)  # the rescaling changes the table
    assert_same_model(ref, model, model.config.vocab_size, seed=5)


def test_mistral_without_sliding_window_loads(tmp_path):
    c = transformers.MistralConfig(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                   max_position_embeddings=256, rope_theta=20000.0)
    ref = randomise(transformers.MistralForCausalLM(c), 3).eval()
    ref.save_pretrained(tmp_path)
    tiny_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    model, _, meta = load_gpt(str(tmp_path))
    assert meta["model_type"] == "mistral"
    assert_same_model(ref, model, 416, seed=2)


def test_transformers_nanochat_port_loads(tmp_path):
    """transformers' own NanoChat layout (config.json + safetensors): nanochat's rotation, its config's epsilon."""
    ref = randomise(transformers.NanoChatForCausalLM(transformers.NanoChatConfig(
        vocab_size=416, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, final_logit_softcapping=12.0)), 5).eval()
    ref.save_pretrained(tmp_path)
    tiny_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    model, _, meta = load_gpt(str(tmp_path))
    c = model.config
    assert meta["model_type"] == "nanochat" and (c.logit_softcap, c.norm_eps, c.mlp, c.qk_norm) == (12.0, 1e-6, "relu2", True)
    assert_same_model(ref, model, 416, seed=3)


def test_llama_shaped_gpt_trains_and_decodes():
    """SwiGLU, gains, tied head: the fused training head equals the plain loss (gradients into the one shared
    matrix from both ends), and cached greedy decoding equals full recomputation."""
    cfg = GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu", intermediate_size=48,
                    norm_gains=True, norm_eps=1e-5, qk_norm=False, tie_embeddings=True, logit_softcap=0.0, input_norm=False)
    m = randomise(GPT(cfg), 6)  # wte; per block 2 gains, q, k, v, o, gate|up, down; final gain
    assert len(list(m.parameters())) == 1 + 2 * 8 + 1 and "lm_head.weight" not in m.state_dict()
    idx, tgt = torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (2, 12))
    _, loss = m(idx, tgt)
    loss.backward()
    with torch.no_grad():
        plain = m(idx, tgt, loss_reduction="none")[1].mean()
    assert torch.allclose(loss, plain, atol=1e-5) and m.transformer.wte.weight.grad.abs().sum() > 0
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    assert torch.equal(m.generate(ids, 10, pad_mask=mask), m.generate(ids, 10, pad_mask=mask, use_cache=False))


def test_hf_tokenizer_equals_reference(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tiny_hf_tokenizer(path)
    tok = pretrained.HFTokenizer(path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path, split_special_tokens=True)
    plain = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    for s in random_strings(seed=1, specials=specials):
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False)
        if not any(x in s for x in specials):
            assert ids == plain.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == plain.decode(ids)
    assert tok.bos == tok["<|begin_of_text|>"] == plain.encode("x")[0]
    assert tok.vocab_size == len(plain)
    tiny_hf_tokenizer(path, bos=False)
    assert pretrained.HFTokenizer(path).bos is None


# -----------------------------------------------------------------------------
# this repo's checkpoints (a bare GPT, a tied one, a recipe's whole model)


def test_own_checkpoints_load(tmp_path):
    cfg = GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp="swiglu", intermediate_size=80,
                    norm_gains=True, norm_eps=1e-5, qk_norm=False, tie_embeddings=True, logit_softcap=0.0)
    gpt = randomise(GPT(cfg), 4).eval()
    save_checkpoint(str(tmp_path / "bare"), gpt, meta=dict(gpt=asdict(cfg)))
    recipe = torch.nn.Module()
    recipe.gpt, recipe.proj = gpt, torch.nn.Linear(8, 64)
    save_checkpoint(str(tmp_path / "recipe"), recipe, meta=dict(recipe="ocr", gpt=asdict(cfg), specials=["[SEG]"]))
    idx = torch.randint(0, 300, (2, 16))
    want = gpt(idx)[0]
    for name in ("bare", "recipe"):
        model, tok, meta = load_gpt(str(tmp_path / name))
        assert model.lm_head.weight is model.transformer.wte.weight
        assert torch.equal(model(idx)[0], want)
        assert tok.encode("hi") == [104, 105] and tok.bos == tok["<|bos|>"]
    assert "[SEG]" in tok.special and meta["recipe"] == "ocr"


# -----------------------------------------------------------------------------
# special tokens appended to a loaded tokenizer, the model grown to match


def write_source(d, source):
    """A tiny checkpoint dir: nanochat's format, or a Llama (tied head or not) with its tokenizer.json."""
    if source == "nanochat":
        write_nanochat(d, nanochat_reference())
    else:
        write_llama(d, tied=source == "llama_tied")
    return d


@pytest.mark.parametrize("source", ["nanochat", "llama_tied"])
def test_special_tokens_grow_the_model(tmp_path, source):
    model, tok, _ = load_gpt(write_source(str(tmp_path), source))
    old_vocab, old_tok = model.config.vocab_size, tok.vocab_size
    wte, head = model.transformer.wte.weight.clone(), model.lm_head.weight.clone()
    existing = next(iter(tok.special))
    ids = add_special_tokens(model, tok, ["<|image|>", "[SEG]", existing, "<vp>"])
    assert ids[2] == tok[existing] and ids[:2] + ids[3:] == list(range(old_tok, old_tok + 3))
    assert tok.encode("<|image|>") != [ids[0]]  # still text when it appears in text
    assert model.config.vocab_size == max(old_vocab, old_tok + 3)
    new = ids[:2] + ids[3:]  # the Llama tokenizer (400 ids) is smaller than its model (416 rows): spare rows taken
    kept = [i for i in range(old_vocab) if i not in new]
    assert torch.equal(model.transformer.wte.weight[kept], wte[kept])
    assert torch.equal(model.lm_head.weight[kept], head[kept])
    for i in new:
        assert torch.allclose(model.transformer.wte.weight[i], wte.mean(0), atol=1e-6)
        assert torch.allclose(model.lm_head.weight[i], head.mean(0), atol=1e-6)
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings
    assert tok.decode([ids[0], tok.encode("a")[0]]) == "a"


# -----------------------------------------------------------------------------
# bad input, one line each


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="no checkpoint") as e:
        load_gpt(str(tmp_path))
    assert one_line(e)

    ref = nanochat_reference()
    d = write_nanochat(str(tmp_path / "vocab"), ref)
    meta_path = os.path.join(d, "meta_000650.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, model_config=dict(meta["model_config"], vocab_size=100)), open(meta_path, "w"))
    with pytest.raises(InputError, match="embedding rows but meta_000650.json says vocab_size 100") as e:
        load_gpt(d)
    assert one_line(e)
    json.dump(dict(meta, model_config=dict(meta["model_config"], n_layer=3)), open(meta_path, "w"))
    with pytest.raises(InputError, match="missing weight 'transformer.h.2.") as e:
        load_gpt(d)
    assert one_line(e)

    d = write_nanochat(str(tmp_path / "newer"), ref)
    path = os.path.join(d, "model_000650.pt")
    state = torch.load(path, weights_only=True)
    state["_orig_mod.resid_lambdas"] = torch.ones(2)
    torch.save(state, path)
    meta_path = os.path.join(d, "meta_000650.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, model_config=dict(meta["model_config"], window_pattern="SSSL")), open(meta_path, "w"))
    with pytest.raises(InputError, match=r"newer nanochat format.*\['window_pattern'\].*\['resid_lambdas'\]") as e:
        load_gpt(d)
    assert one_line(e)

    d = write_nanochat(str(tmp_path / "small"), nanochat_reference(vocab=200))
    with pytest.raises(InputError, match="tokenizer has 285 ids but the model's vocab is only 200") as e:
        load_gpt(d)
    assert one_line(e)

    write_llama(str(tmp_path / "gpt2"), tied=False)
    cfg_path = tmp_path / "gpt2" / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, model_type="qwen2"), open(cfg_path, "w"))
    with pytest.raises(InputError, match="model_type 'qwen2' is not supported") as e:
        load_gpt(str(tmp_path / "gpt2"))
    assert one_line(e)
    for change, message in [(dict(rope_parameters=dict(rope_type="yarn", rope_theta=5e5, factor=8.0)), "rope type 'yarn'"),
                            (dict(attention_bias=True), "attention_bias=True"),
                            (dict(hidden_act="gelu"), "hidden_act='gelu'")]:
        json.dump(dict(cfg, **change), open(cfg_path, "w"))
        with pytest.raises(InputError, match=message) as e:
            load_gpt(str(tmp_path / "gpt2"))
        assert one_line(e)


# -----------------------------------------------------------------------------
# sample.py


@pytest.mark.parametrize("source", ["nanochat", "llama"])
def test_sample_prints_the_greedy_continuation(tmp_path, source):
    model, tok, _ = load_gpt(write_source(str(tmp_path), source))
    prompt = "the quick brown"
    ids = [tok.bos] + tok.encode(prompt)
    want = tok.decode(model.generate(torch.tensor([ids]), 16)[0].tolist())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--init_from={tmp_path}",
                          f"--prompt={prompt}", "--max_new_tokens=16", "--temperature=0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(want + "\n") and len(want) > 0
