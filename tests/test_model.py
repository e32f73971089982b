"""Tests of model.py: GPT against a naive float64 reference, causality, KV-cache generation, the vision
scatter, KVCache guards, ViT queries and cached K/V (the run's plumbing: test_runtime.py, test_checkpoint.py).
Everything is tiny and on CPU."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from model import GPT, GPTConfig, InputError, KVCache, ViT, ViTConfig

F32_EPS = torch.finfo(torch.float32).eps


def tiny_gpt(seed=0, **kw):
    cfg = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, sequence_len=64)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**cfg))
    # GPT zero-initialises the residual projections (every block starts as the identity), which would make
    # attention invisible to these tests: give every matrix random weights.
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=1.0 / math.sqrt(mod.weight.shape[1]))
    return m.eval()


# -----------------------------------------------------------------------------
# naive float64 reference: explicit softmax(QK^T / sqrt(d)) with a causal mask, rotary, QK-norm, GQA


def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + F32_EPS)


def naive_rope(x, positions, base):
    """x (B, T, H, D) float64; the pair (i, i + D/2) is rotated by -pos * base^(-2i/D) (nanochat's convention)."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = positions.double()[..., None] * inv          # (T, D/2) or (B, T, D/2)
    if ang.dim() == 2:
        ang = ang[None]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def naive_attention(attn, x, positions, key_valid=None, base=10000.0, block=None):
    """x (B, T, C) float64. key_valid (B, T) bool: keys that may be attended (left padding). block (B, T) bool:
    tokens that also see each other both ways."""
    B, T, C = x.shape
    H, Hkv = attn.n_head, attn.n_kv_head
    D = C // H
    W = lambda lin: lin.weight.detach().double()
    q = naive_rope((x @ W(attn.c_q).T).view(B, T, H, D), positions, base)
    k = naive_rope((x @ W(attn.c_k).T).view(B, T, Hkv, D), positions, base)
    v = (x @ W(attn.c_v).T).view(B, T, Hkv, D)
    q, k = rms(q), rms(k)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        allowed = causal.clone()
        if key_valid is not None:
            allowed &= key_valid[b][None, :]
            allowed |= torch.eye(T, dtype=torch.bool)
        if block is not None:
            allowed |= block[b][:, None] & block[b][None, :]
        for h in range(H):
            g = h // (H // Hkv)                      # query head h reads kv head h // n_rep
            s = q[b, :, h] @ k[b, :, g].T / math.sqrt(D)
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.exp(s - s.max(-1, keepdim=True).values)
            p = p / p.sum(-1, keepdim=True)
            y[b, :, h] = p @ v[b, :, g]
    return y.reshape(B, T, C) @ W(attn.c_proj).T


def naive_gpt_logits(m, idx, pad_mask=None, block=None):
    cfg = m.config
    if pad_mask is None:
        pad_mask = torch.ones_like(idx, dtype=torch.bool)
    positions = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    x = m.transformer.wte.weight.detach().double()[idx]
    x = rms(x) if cfg.input_norm else x
    for blk in m.transformer.h:
        x = x + naive_attention(blk.attn, rms(x), positions, pad_mask, cfg.rope_base, block)
        h = rms(x) @ blk.mlp.c_fc.weight.detach().double().T
        x = x + torch.relu(h).square() @ blk.mlp.c_proj.weight.detach().double().T
    logits = rms(x) @ m.lm_head.weight.detach().double().T
    cap = cfg.logit_softcap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_module_matches_naive_float64(n_kv_head):
    m = tiny_gpt(n_kv_head=n_kv_head)
    attn = m.transformer.h[0].attn
    torch.manual_seed(1)
    x = torch.randn(2, 11, 32)
    T = x.shape[1]
    got = attn(x, m.cos[:T], m.sin[:T])
    ref = naive_attention(attn, x.double(), torch.arange(T))
    assert (got.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_rotary_matches_naive_float64_in_the_input_dtype(dtype, tol):
    # the fp32 tables are cast to x's dtype (bf16 under autocast), so q and k never round-trip through fp32
    m = tiny_gpt()
    x = torch.randn(2, 9, 4, 8, generator=torch.Generator().manual_seed(3))
    got = M.apply_rotary(x.to(dtype), m.cos[:9], m.sin[:9])
    assert got.dtype == dtype
    assert (got.double() - naive_rope(x.double(), torch.arange(9), 10000.0)).abs().max() < tol


@pytest.mark.parametrize("n_kv_head,softcap", [(4, 15.0), (2, 15.0), (1, 0.0)])
def test_gpt_logits_match_naive_float64(n_kv_head, softcap):
    m = tiny_gpt(n_kv_head=n_kv_head, logit_softcap=softcap)
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    logits, _ = m(idx)
    ref = naive_gpt_logits(m, idx)
    assert (logits.double() - ref).abs().max() < 1e-4
    # the explicit-mask path (pad_mask all True) is the same computation as is_causal
    logits_masked, _ = m(idx, pad_mask=torch.ones_like(idx, dtype=torch.bool))
    assert (logits_masked - logits).abs().max() < 1e-5


def test_gpt_without_input_norm_matches_naive_float64():
    m = tiny_gpt(input_norm=False)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(3.0)  # embeddings far from unit RMS: the switch must matter
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    logits, _ = m(idx)
    assert (logits.double() - naive_gpt_logits(m, idx)).abs().max() < 1e-4
    m.config.input_norm = True
    normed, _ = m(idx)
    assert (normed - logits).abs().max() > 1e-2


def two_rows(seed, long, short):
    """Two random token rows, the second left-padded to the first's length -> (idx, pad_mask or None if unpadded)."""
    g = torch.Generator().manual_seed(seed)
    idx, mask = M.left_pad([torch.randint(0, 64, (L,), generator=g).tolist() for L in (long, short)])
    return idx, (mask if short < long else None)


def block_logits(m, idx, pad_mask=None, block=None, kv_cache=None):
    return m.logits(m.forward_embeds(m.transformer.wte(idx), pad_mask, kv_cache, block=block))


@pytest.mark.parametrize("padded", [False, True])
def test_block_attention_matches_naive_float64(padded):
    """block=: the marked tokens (an image) see each other both ways; the rest stays causal."""
    m = tiny_gpt()
    idx, mask = two_rows(seed=1, long=12, short=8 if padded else 12)
    block = torch.zeros_like(idx, dtype=torch.bool)
    block[0, 2:7] = True
    block[1, 3:9] = True  # padded: its first token is a pad, which must stay invisible
    got = block_logits(m, idx, mask, block)
    valid = torch.ones_like(block) if mask is None else mask
    assert (got.double() - naive_gpt_logits(m, idx, mask, block & valid)).abs()[valid].max() < 1e-4
    # an early block token now reads a later one; the tokens before the block still do not
    changed = idx.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 64
    out = block_logits(m, changed, mask, block)
    assert (out[0, 2] - got[0, 2]).abs().max() > 1e-3 and (out[0, :2] - got[0, :2]).abs().max() < 1e-6


@pytest.mark.parametrize("padded", [False, True])
def test_block_prefill_then_cached_decode_equals_full_forward(padded):
    m = tiny_gpt()
    idx, mask = two_rows(seed=2, long=14, short=10 if padded else 14)
    block = torch.zeros_like(idx, dtype=torch.bool)
    block[:, 3:8] = True
    full = block_logits(m, idx, mask, block)
    cache = KVCache(batch_size=2, num_heads=2, seq_len=14, head_dim=8, num_layers=2)
    pre = block_logits(m, idx[:, :9], None if mask is None else mask[:, :9], block[:, :9], cache)
    steps = [block_logits(m, idx[:, t:t + 1], kv_cache=cache) for t in range(9, 14)]
    got = torch.cat([pre] + steps, 1)
    valid = torch.ones_like(block) if mask is None else mask
    assert (got - full).abs()[valid].max() < 1e-5
    with pytest.raises(ValueError, match="position 0"):
        block_logits(m, idx[:, :1], kv_cache=cache, block=block[:, :1])


def test_left_padded_logits_match_naive_and_unpadded():
    m = tiny_gpt()
    ids, mask = M.left_pad([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]], pad_id=0)
    logits, _ = m(ids, pad_mask=mask)
    ref = naive_gpt_logits(m, ids, mask)
    assert (logits.double() - ref).abs()[mask].max() < 1e-4
    alone, _ = m(torch.tensor([[8, 9, 10]]))
    assert (logits[1, -3:] - alone[0]).abs().max() < 1e-5


def test_loss_ignores_minus_one_targets():
    m = tiny_gpt()
    idx = torch.randint(0, 64, (2, 8))
    tgt = idx.roll(-1, 1)
    tgt[:, :4] = -1
    logits, loss = m(idx, tgt)  # training: the fused head, no logits
    assert logits is None
    with torch.no_grad():
        logits, eval_loss = m(idx, tgt)  # eval: plain logits -> softcap -> F.cross_entropy
    ref = F.cross_entropy(logits[:, 4:].reshape(-1, 64), tgt[:, 4:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(eval_loss, ref, atol=1e-6)


@pytest.mark.parametrize("cap,reduction,chunk", [(15.0, "mean", 32), (0.0, "mean", 32), (15.0, "sum", 32),
                                                 (15.0, "mean", None)])
def test_fused_head_loss_matches_plain_float64_reference(cap, reduction, chunk):
    from model import head_loss
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 16, generator=g, requires_grad=True)
    w = (torch.randn(40, 16, generator=g) * 2).requires_grad_()   # large logits: the softcap matters
    t = torch.randint(0, 40, (3, 50), generator=g)
    t[0, :7] = -1
    loss = head_loss(h, w, t, cap, reduction, chunk=chunk)  # 32: chunks of 32 + a ragged 22; None: sized by logits
    loss.backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = hd.reshape(-1, 16) @ wd.t()
    z = cap * torch.tanh(z / cap) if cap > 0 else z
    ref = F.cross_entropy(z, t.reshape(-1), ignore_index=-1, reduction=reduction)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    assert (h.grad.double() - hd.grad).abs().max() < 1e-5
    assert (w.grad.double() - wd.grad).abs().max() < 1e-5


@pytest.mark.parametrize("vocab,rows", [(8192, 256), (65536, 128), (260, 8065)])
def test_fused_head_chunk_rows_follow_the_logit_budget(monkeypatch, vocab, rows):
    """CPU chunks hold 2^21 logits (256 rows at vocab 8192), never fewer than 128 rows; a small vocab is one chunk."""
    import model as M
    seen = []
    monkeypatch.setattr(M._FusedHeadLoss, "apply", lambda h, w, t, cap, chunk: seen.append(chunk) or h.sum())
    M.head_loss(torch.randn(4, 8, requires_grad=True), torch.zeros(vocab, 8), torch.zeros(4, dtype=torch.long), 15.0)
    assert seen == [rows]


def test_fused_head_loss_frozen_weight_and_frozen_input():
    from model import head_loss
    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(12, 8)
    t = torch.randint(0, 12, (10,))
    head_loss(h, w, t, 15.0).backward()  # weight without grad: only h gets one
    assert h.grad is not None and w.grad is None
    w.requires_grad_(True)
    head_loss(h.detach(), w, t, 15.0).backward()
    assert w.grad is not None


def test_relu_squared_backward_matches_autograd():
    from model import relu_squared
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 33, dtype=torch.float64)
    (relu_squared(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (F.relu(x2).square() * g).sum().backward()
    assert torch.equal(relu_squared(x), F.relu(x2).square()) and torch.allclose(x.grad, x2.grad)


@pytest.mark.parametrize("padded", [False, True])
def test_causal_mask_future_tokens_never_change_earlier_logits(padded):
    m = tiny_gpt()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 64, (2, 16), generator=g)
    mask = torch.ones_like(idx, dtype=torch.bool) if padded else None
    base, _ = m(idx, pad_mask=mask)
    for t in (1, 7, 15):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 62, changed[:, t:].shape, generator=g)) % 64
        out, _ = m(changed, pad_mask=mask)
        assert (out[:, :t] - base[:, :t]).abs().max() < 1e-6
        assert (out[:, t:] - base[:, t:]).abs().max() > 1e-3  # and the model does look at the tokens


# -----------------------------------------------------------------------------
# generation


VOCAB, IMG = 64, 63


def vlm_prompts(B, n_img, seed=0, lengths=None):
    """Prompts with n_img image tokens each (after one text token), and matching vision embeddings."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [9] * B
    seqs = []
    for L in lengths:
        text = torch.randint(0, IMG, (L,), generator=g).tolist()
        seqs.append(text[:1] + [IMG] * n_img + text[1:])
    vis = torch.randn(B, n_img, 32, generator=g) if n_img else None
    return seqs, vis


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("n_img", [0, 4])
def test_kv_cache_greedy_equals_full_recomputation(B, n_img):
    m = tiny_gpt(image_token_id=IMG)
    seqs, vis = vlm_prompts(B, n_img)
    idx = torch.tensor(seqs)
    cached = m.generate(idx, 20, vision_embeds=vis, use_cache=True)
    full = m.generate(idx, 20, vision_embeds=vis, use_cache=False)
    assert cached.shape == (B, 20)
    assert torch.equal(cached, full)
    assert len(set(cached.flatten().tolist())) > 3  # not a degenerate constant output


@pytest.mark.parametrize("autocast", [False, True])
def test_generate_keeps_cache_and_decode_weights_in_the_compute_dtype(monkeypatch, autocast):
    """Under bf16 autocast the cache and the packed decode weights are bf16: an fp32 cache was cast whole at every
    step and the packed fp32 weights at every matmul (bf16 decoding ran at half speed). Without it, fp32."""
    made = []

    class RecordingCache(M.KVCache):
        def __init__(self, **kw):
            super().__init__(**kw)
            made.append(self)

    monkeypatch.setattr(M, "KVCache", RecordingCache)
    m = tiny_gpt()
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m.generate(idx, 6)
    want = torch.bfloat16 if autocast else torch.float32
    (cache,) = made
    assert out.shape == (2, 6) and cache.k.dtype == cache.v.dtype == want
    assert {w.dtype for layer in cache.weights for w in layer.values()} == {want}


def test_decode_weights_are_the_weights_as_in_out():
    """Every packed matrix is its nn.Linear weight transposed to (in, out), whatever the memory layout chosen."""
    m = tiny_gpt()
    layers, head = m.decode_weights()
    for block, w in zip(m.transformer.h, layers):
        a = block.attn
        assert torch.equal(w["qkv"], torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight]).t())
        assert torch.equal(w["proj"], a.c_proj.weight.t())
        assert torch.equal(w["fc"], block.mlp.c_fc.weight.t())
        assert torch.equal(w["down"], block.mlp.c_proj.weight.t())
    assert torch.equal(head, m.lm_head.weight.t())


def test_kv_cache_logits_equal_full_forward():
    """Prefill + one-token decode steps through the cache give the same logits as the full forward."""
    m = tiny_gpt()
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    full, _ = m(idx)
    cache = KVCache(batch_size=2, num_heads=2, seq_len=12, head_dim=8, num_layers=2)
    pre, _ = m(idx[:, :7], kv_cache=cache)
    steps = [m(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    got = torch.cat([pre] + steps, 1)
    assert (got - full).abs().max() < 1e-5
    assert cache.pos == 12


@pytest.mark.parametrize("n_img", [0, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(n_img, use_cache):
    m = tiny_gpt(image_token_id=IMG)
    seqs, vis = vlm_prompts(3, n_img, seed=1, lengths=[2, 9, 5])
    ids, mask = M.left_pad(seqs)
    batch = m.generate(ids, 12, vision_embeds=vis, pad_mask=mask, use_cache=use_cache)
    for i, s in enumerate(seqs):
        alone = m.generate(torch.tensor([s]), 12, vision_embeds=None if vis is None else vis[i:i + 1])
        assert torch.equal(batch[i], alone[0]), i


def test_image_token_never_generated():
    m = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3, 4]])
    free = m.generate(prompt, 8)
    m.config.image_token_id = int(free[0, 0])  # the token greedy decoding wants most
    out = m.generate(prompt, 8)
    assert int(free[0, 0]) not in out.tolist()[0]
    sampled = m.generate(prompt.repeat(64, 1), 8, temperature=5.0,
                         generator=torch.Generator().manual_seed(0))
    assert not (sampled == m.config.image_token_id).any()
    # suppress_ids bans other input-only tokens the same way
    banned = int(out[0, 0])
    assert banned not in m.generate(prompt, 8, suppress_ids=[banned]).tolist()[0]


def test_eos_stops_generation_and_pads_finished_rows():
    m = tiny_gpt()
    prompts = torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    free = m.generate(prompts, 10)
    eos = int(free[0, 2])
    out = m.generate(prompts, 10, eos_id=eos)
    first = [row.index(eos) if eos in row else None for row in free.tolist()]
    assert out.shape[1] == (10 if None in first else max(first) + 1)  # stops once every row has ended
    k = first[0]
    assert torch.equal(out[0, :k + 1], free[0, :k + 1])
    assert (out[0, k + 1:] == eos).all()  # a finished row is filled with eos
    single = m.generate(prompts[:1], 10, eos_id=eos)
    assert single.tolist()[0] == free[0, :k + 1].tolist()  # stops right after eos


def test_top_k_sampling_only_picks_from_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = torch.topk(logits, 5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    picks = torch.stack([M.sample_next(logits, temperature=2.0, top_k=5, generator=g) for _ in range(300)], 1)
    for b in range(4):
        assert set(picks[b].tolist()) <= set(top[b].tolist())
        assert len(set(picks[b].tolist())) == 5  # high temperature: all five do occur
    # banned ids are removed before top-k
    best = logits.argmax(-1)
    picks = M.sample_next(logits, temperature=0.0, banned=best.tolist())
    assert not (picks == best).any()
    # generate: top_k=1 is greedy whatever the temperature
    m = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(m.generate(prompt, 6, temperature=1.0, top_k=1), m.generate(prompt, 6))


def test_sampling_is_reproducible_with_a_generator():
    m = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]] * 2)
    a = m.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = m.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# vision-token scatter


def test_scatter_writes_rows_in_order():
    m = tiny_gpt(image_token_id=IMG)
    idx = torch.tensor([[1, IMG, IMG, 2], [IMG, 3, 4, IMG]])
    vis = torch.randn(2, 2, 32)
    x = m.embed(idx, vis)
    assert torch.equal(x[0, 1], vis[0, 0]) and torch.equal(x[0, 2], vis[0, 1])
    assert torch.equal(x[1, 0], vis[1, 0]) and torch.equal(x[1, 3], vis[1, 1])
    assert torch.equal(x[0, 0], m.transformer.wte.weight[1])


def test_scatter_count_mismatch_raises_naming_both_counts():
    m = tiny_gpt(image_token_id=IMG)
    idx = torch.tensor([[1] + [IMG] * 256 + [2]])
    with pytest.raises(ValueError) as e:
        m.embed(idx, torch.randn(1, 257, 32))
    assert "256" in str(e.value) and "257" in str(e.value)
    # image tokens but no embeddings: a prompt shorter than the rotary table, so only the count check can refuse it
    with pytest.raises(ValueError, match=r"prompt has 2 image-token positions .* but 0 vision embeddings"):
        m(torch.tensor([[1, IMG, IMG, 2]]))
    with pytest.raises(ValueError, match=r"prompt has 0 image-token positions .* but 5 vision embeddings"):
        tiny_gpt()(torch.tensor([[1, 2]]), vision_embeds=torch.randn(1, 5, 32))  # no image token at all

    # the same total, split wrong: (B, N, C) embeddings need N image tokens in every prompt
    idx = torch.tensor([[1, IMG, IMG, IMG, 2], [1, IMG, 2, 2, 2]])
    with pytest.raises(ValueError, match=r"mismatch in prompt 0: 3 image-token positions but 2 vision embeddings"):
        m.embed(idx, torch.randn(2, 2, 32))
    m.embed(idx, torch.randn(4, 32))  # flat rows may be split unevenly (a variable count per prompt, as seg's)


def test_scatter_width_mismatch_raises():
    m = tiny_gpt(image_token_id=IMG)
    idx = torch.tensor([[1, IMG, IMG, 2]])
    with pytest.raises(ValueError, match="64"):
        m.embed(idx, torch.randn(1, 2, 64))  # projector output 64 wide, LM 32 wide


# -----------------------------------------------------------------------------
# KVCache guards


def test_kvcache_is_keyword_only():
    with pytest.raises(TypeError):
        KVCache(1, 2, 16, 8, 2)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(num_heads=-1), dict(seq_len=2.5), dict(head_dim=None)])
def test_kvcache_rejects_invalid_sizes(bad):
    sizes = dict(batch_size=1, num_heads=2, seq_len=16, head_dim=8, num_layers=2)
    sizes.update(bad)
    with pytest.raises(InputError, match=list(bad)[0]):
        KVCache(**sizes)


def test_kvcache_refuses_huge_allocation_with_a_message():
    # seq_len and head_dim swapped with a vocab-sized number: refused before allocating anything
    with pytest.raises(InputError, match="GiB.*swapped"):
        KVCache(batch_size=64, num_heads=32, seq_len=50304, head_dim=4096, num_layers=32)


def test_kvcache_insert_rejects_wrong_shapes():
    cache = KVCache(batch_size=2, num_heads=2, seq_len=16, head_dim=8, num_layers=2)
    ok = torch.randn(2, 2, 5, 8)
    with pytest.raises(AssertionError, match="heads"):
        cache.insert_kv(0, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))  # wrong head count
    with pytest.raises(AssertionError):
        cache.insert_kv(0, ok.transpose(1, 2), ok.transpose(1, 2))  # (B, T, H, D) instead of (B, H, T, D)
    with pytest.raises(AssertionError):
        cache.insert_kv(0, ok, torch.randn(2, 2, 4, 8))  # k and v disagree
    with pytest.raises(AssertionError, match="full"):
        cache.insert_kv(0, torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8))
    k, v = cache.insert_kv(0, ok, ok)
    assert k.shape == (2, 2, 5, 8) and cache.pos == 0  # pos advances after the last layer
    cache.insert_kv(1, ok, ok)
    assert cache.pos == 5


def test_kvcache_built_with_swapped_heads_and_head_dim_fails_at_first_use():
    m = tiny_gpt()  # 2 kv heads of dim 8
    cache = KVCache(batch_size=1, num_heads=8, seq_len=16, head_dim=2, num_layers=2)
    with pytest.raises(AssertionError):
        m(torch.tensor([[1, 2, 3]]), kv_cache=cache)


# -----------------------------------------------------------------------------
# ViT: deep/shallow queries, cached patch K/V, attention maps


def tiny_vit(mode="deep", seed=0, **kw):
    cfg = dict(image_size=16, patch_size=4, n_layer=3, n_head=2, n_embd=32, query_mode=mode)
    cfg.update(kw)
    torch.manual_seed(seed)
    return ViT(ViTConfig(**cfg)).eval()


def joint_reference(vit, images, queries):
    """Recompute from scratch: patches and queries in one sequence through the blocks, with a mask under
    which patches see patches only and queries see everything (the deep/shallow rule applied per layer)."""
    x = vit.tokens(images)
    N = x.shape[1]
    first = 0 if vit.config.query_mode == "deep" else len(vit.blocks) - 1
    qx = queries
    for i, blk in enumerate(vit.blocks):
        if i < first:
            x = blk(x)[0]
            continue
        z = torch.cat([x, qx], 1)
        B, S, C = z.shape
        q, k, v = blk.heads(z)
        allowed = torch.ones(S, S, dtype=torch.bool)
        allowed[:N, N:] = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        z = z + blk.proj(y.transpose(1, 2).reshape(B, S, C))
        z = z + blk.mlp(blk.ln_2(z))
        x, qx = z[:, :N], z[:, N:]
    return vit.ln_f(x), vit.ln_f(qx)


@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_vit_reading_cached_kv_equals_joint_recomputation(mode):
    vit = tiny_vit(mode)
    images = torch.rand(2, 3, 16, 16)
    queries = torch.randn(2, 5, 32)
    cache = vit.encode(images)
    out, maps = vit.read(queries, cache)
    ref_patches, ref_queries = joint_reference(vit, images, queries)
    assert (cache["features"] - ref_patches).abs().max() < 1e-5
    assert (out - ref_queries).abs().max() < 1e-5
    assert len(maps) == (3 if mode == "deep" else 1)
    assert len(cache["layers"]) == 3 and len(cache["kv"]) == 3
    assert torch.equal(vit(images), cache["features"])


def test_vit_patch_features_unaffected_by_queries_and_cache_reusable():
    vit = tiny_vit("deep")
    images = torch.rand(1, 3, 16, 16)
    cache = vit.encode(images)
    kv_before = [(k.clone(), v.clone()) for k, v in cache["kv"]]
    feats_before = cache["features"].clone()
    q1, q2 = torch.randn(1, 4, 32), torch.randn(1, 7, 32)
    out1, _ = vit.read(q1, cache)
    vit.read(q2, cache)
    for (k, v), (k0, v0) in zip(cache["kv"], kv_before):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(cache["features"], feats_before)
    # one frame encoded once, queried many times == encoded afresh for each query set
    fresh, _ = vit.read(q1, vit.encode(images))
    assert torch.equal(out1, fresh)
    # in the joint recomputation too, the patch features never depend on the queries
    assert torch.equal(joint_reference(vit, images, q2)[0], joint_reference(vit, images, q1)[0])


def test_vit_deep_and_shallow_queries_differ():
    deep, shallow = tiny_vit("deep"), tiny_vit("shallow")
    shallow.load_state_dict(deep.state_dict())
    images, queries = torch.rand(2, 3, 16, 16), torch.randn(2, 4, 32)
    cd, cs = deep.encode(images), shallow.encode(images)
    assert torch.equal(cd["features"], cs["features"])  # patches do not care about the query mode
    od, _ = deep.read(queries, cd)
    os_, _ = shallow.read(queries, cs)
    assert (od - os_).abs().max() > 1e-2


def test_vit_attention_maps_and_temperature():
    vit = tiny_vit("deep")
    images, queries = torch.rand(2, 3, 16, 16), torch.randn(2, 4, 32)
    cache = vit.encode(images)
    _, maps = vit.read(queries, cache)
    for att in maps:
        assert att.shape == (2, 4, 16)
        s = att.sum(-1)
        assert (att >= 0).all() and (s <= 1 + 1e-5).all() and (s > 0).all()

    def entropy(att):
        p = att / att.sum(-1, keepdim=True)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()

    # a single-head, single-layer read, where the sharpening is exact: lower temperature, lower entropy
    vit1 = tiny_vit("shallow", n_layer=1, n_head=1)
    cache1 = vit1.encode(images)
    ents = [entropy(vit1.read(queries, cache1, temperature=t)[1][0]) for t in (2.0, 1.0, 0.5, 0.1)]
    assert all(a > b for a, b in zip(ents, ents[1:])), ents
    # the config default is what read() uses when no temperature is passed
    vit1.config.attn_temperature = 0.5
    assert torch.equal(vit1.read(queries, cache1)[1][0], vit1.read(queries, cache1, temperature=0.5)[1][0])


def test_vit_read_bias_adds_to_the_query_patch_logits():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32))
    cache = vit.encode(torch.randn(2, 3, 16, 16))
    queries = torch.randn(2, 3, 32)
    out0, maps0 = vit.read(queries, cache)
    out_z, maps_z = vit.read(queries, cache, bias=torch.zeros(2, 3, 16))
    assert torch.allclose(out0, out_z) and all(torch.allclose(a, b) for a, b in zip(maps0, maps_z))
    bias = torch.full((2, 3, 16), -1e4)
    bias[:, :, 5] = 0.0  # every query may only look at patch 5 (or itself)
    _, maps = vit.read(queries, cache, bias=bias)
    for m in maps:
        assert (m.argmax(-1) == 5).all() and torch.allclose(m.sum(-1), m[..., 5])


def test_patch_embedding_is_the_strided_conv():
    # the ViT's (and the OCR's SAM-like encoder's) patch conv, computed as one matmul: equal to F.conv2d in float64,
    # including a remainder of pixels that makes no whole patch (26 x 30 with 4-px patches: 6 x 7 patches)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4).double()
    images = torch.randn(2, 3, 26, 30, dtype=torch.float64)
    got = M.embed_patches(images, conv)
    assert got.shape == (2, 6, 7, 5)
    assert torch.allclose(got, conv(images).permute(0, 2, 3, 1), atol=1e-12)
    with pytest.raises(ValueError, match="kernel = stride"):
        M.embed_patches(images, torch.nn.Conv2d(3, 5, 4, stride=2))


def test_vit_token_input_mode_and_count_check():
    vit = tiny_vit(patch_embed=False, num_tokens=10)
    feats = vit(torch.randn(2, 10, 32))
    assert feats.shape == (2, 10, 32)
    with pytest.raises(InputError, match="10"):
        vit(torch.randn(2, 11, 32))


# -----------------------------------------------------------------------------
# training mechanisms


def test_resize_token_embeddings_keeps_old_rows():
    m = tiny_gpt()
    wte, head = m.transformer.wte.weight.clone(), m.lm_head.weight.clone()
    idx = torch.tensor([[1, 2, 3]])
    before, _ = m(idx)
    m.config.logit_softcap = 0.0
    before_nocap, _ = m(idx)
    m.resize_token_embeddings(70)
    assert m.transformer.wte.weight.shape == (70, 32) and m.lm_head.weight.shape == (70, 32)
    assert torch.equal(m.transformer.wte.weight[:64], wte) and torch.equal(m.lm_head.weight[:64], head)
    assert m.config.vocab_size == 70
    after, _ = m(idx)
    assert torch.allclose(after[..., :64], before_nocap, atol=1e-6)
    m.resize_token_embeddings(70)  # no-op
    with pytest.raises(InputError, match="shrink"):
        m.resize_token_embeddings(10)
    assert before.shape[-1] == 64


# -----------------------------------------------------------------------------
# checkpoints


# -----------------------------------------------------------------------------
# from_pretrained


def test_fused_head_loss_under_bf16_autocast_matches_the_plain_path():
    from model import head_loss
    g = torch.Generator().manual_seed(1)
    h = torch.randn(70, 32, generator=g, requires_grad=True)
    w = torch.randn(50, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (70,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = head_loss(h, w, t, 15.0, chunk=32)
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = h @ w.t()  # the plain path: a bf16 matmul, then softcap + CE in fp32
        plain = F.cross_entropy(15.0 * torch.tanh(z.float() / 15.0), t)
    plain.backward()
    assert fused.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(fused.item() - plain.item()) < 1e-2 * plain.item()
    assert (gh - h.grad).abs().max() < 2e-2 * h.grad.abs().max() and (gw - w.grad).abs().max() < 2e-2 * w.grad.abs().max()




def test_activation_checkpointing_gives_the_same_gradients():
    from model import ViT, ViTConfig, set_checkpointing
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, sequence_len=32))
    vit = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32))
    for p in list(gpt.parameters()) + list(vit.parameters()):  # no zero-initialised projections: every path matters
        torch.nn.init.normal_(p, std=0.3)
    idx, images = torch.randint(0, 64, (2, 16)), torch.randn(2, 3, 16, 16)

    def grads():
        gpt.zero_grad(), vit.zero_grad()
        _, loss = gpt(idx[:, :-1], targets=idx[:, 1:])
        (loss + vit(images).square().mean()).backward()
        return [p.grad.clone() for p in list(gpt.parameters()) + list(vit.parameters())]

    calls = []
    for block in (gpt.transformer.h[0], vit.blocks[0]):
        block.register_forward_pre_hook(lambda m, i: calls.append(type(m).__name__))  # recompute may stop early
    plain = grads()
    assert calls == ["ViTBlock", "Block"] or calls == ["Block", "ViTBlock"]
    set_checkpointing(gpt), set_checkpointing(vit)
    calls.clear()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sorted(calls) == ["Block", "Block", "ViTBlock", "ViTBlock"]  # each block ran again in the backward
