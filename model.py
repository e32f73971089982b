"""
The models and their maths, shared by every recipe (the run around them is runtime.py and checkpoint.py):

  GPT        decoder-only LM (RMSNorm, rotary, SDPA attention, explicit GQA, relu^2 MLP,
             untied head), vision-token scatter, KV-cache generation. Parameter names follow
             nanochat's GPT; what the Llama family needs (SwiGLU, norm gains and epsilon, QK-norm off,
             tied head) are config fields (pretrained.py converts the weights).
  ViT        patch encoder with per-layer patch K/V that can be cached, and query tokens that
             read the patches at every layer (deep) or only at the last one (shallow).
  Projector  vision width -> LM width.
  FLOPs      per token, for MFU.
"""
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class InputError(ValueError):
    """Bad input from the user (config, data, checkpoint): printed as one clear line, no traceback
    (runtime.install_error_hook)."""



# -----------------------------------------------------------------------------
# GPT


@dataclass
class GPTConfig:
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4          # < n_head gives grouped-query attention
    n_embd: int = 256
    sequence_len: int = 512     # rotary table covers 4x this
    image_token_id: int = -1    # token whose positions receive vision embeddings (-1: none)
    logit_softcap: float = 15.0  # nanochat's tanh softcap; 0 disables
    rope_base: float = 10000.0
    rope_llama3: tuple = ()     # Llama 3.x's frequency rescaling: (factor, low_freq_factor, high_freq_factor,
                                #   original_max_position_embeddings); () = plain rotary
    input_norm: bool = True     # RMS-normalise the input embeddings before the first block (nanochat does); off,
                                #   the projector sets the image tokens' scale against the words' (train_pointer)
    mlp: str = "relu2"          # 'relu2' (nanochat) | 'swiglu' (Llama: down(silu(gate x) * up x), gate|up in c_fc)
    intermediate_size: int = 0  # the MLP's hidden width; 0 = 4 * n_embd
    norm_gains: bool = False    # RMSNorm with a learnable gain before each block part and the head (Llama)
    norm_eps: float | None = None  # RMSNorm epsilon; None = F.rms_norm's default (the dtype's eps, as nanochat)
    qk_norm: bool = True        # RMS-normalise q and k after rotary (nanochat); Llama has none
    tie_embeddings: bool = False  # the head reuses the token embedding's matrix (Llama's tie_word_embeddings)

    def __post_init__(self):
        self.rope_llama3 = tuple(self.rope_llama3)  # a JSON meta gives a list


def norm(x, eps=None):
    # parameter-free RMSNorm, as nanochat
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with a learnable gain only when asked (nanochat's has none, Llama's has one)."""

    def __init__(self, dim, eps=None, gain=False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class TiedHead(nn.Module):
    """The output head when it shares the token embedding's matrix: no parameter of its own, so the state dict,
    the optimizer and safetensors see the matrix once (as the embedding)."""

    def __init__(self, wte):
        super().__init__()
        self.wte = [wte]  # in a list: not registered as a submodule, so not saved twice

    @property
    def weight(self):
        return self.wte[0].weight

    def forward(self, x):
        return F.linear(x, self.weight)


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos/sin: (T, D) or (B, T, D) rows of rotary_table. Rotates the pair (x1, x2) of the
    two halves to (x1 c + x2 s, x2 c - x1 s): with the table's cos = [c, c] and sin = [s, -s] that is
    x * cos + halves_swapped(x) * sin, three ops (slicing, four products and a cat took ten: 4x slower in a
    decode step, 2.4x in training). In x's dtype, as nanochat: under bf16 autocast fp32 tables would promote
    the products to fp32 and cost a cast of q and k back, forward and backward (a bf16 bench-shape training step:
    0.73-0.75 -> 0.71-0.73 s)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = (cos[None, :, None], sin[None, :, None]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class _FusedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of cap * tanh((h @ W^T) / cap) in row chunks, with the gradients computed in the
    same pass: the (N, V) logits never exist whole and each chunk's softmax / tanh work stays in cache.
    (On the CPU bench this head is ~2x faster than logits -> softcap -> F.cross_entropy; tests compare both.)"""

    @staticmethod
    def forward(ctx, h, weight, targets, cap, chunk):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            rows, valid, tcc = torch.arange(hc.shape[0], device=h.device), tc >= 0, tc.clamp(min=0)
            z = (hc @ weight.t()).float()  # matmuls in the input dtype (bf16 under autocast), the rest in fp32
            if cap > 0:
                # cap * tanh(z / cap) written as 2 cap sigmoid(2 z / cap) - cap: the same function, and torch's
                # CPU sigmoid is ~4x faster than its tanh (10 vs 39 ms over this bench's 2048 x 8192 logits)
                sig = torch.sigmoid(z.mul_(2 / cap))
                z = torch.mul(sig, 2 * cap, out=z).sub_(cap)
            g = torch.log_softmax(z, 1)
            loss -= (g[rows, tcc] * valid).sum()
            g.exp_()
            g[rows, tcc] -= 1  # d loss / d capped logits = softmax - one_hot
            if not bool(valid.all()):
                g[~valid] = 0  # ignored rows
            if cap > 0:
                g.mul_(torch.addcmul(sig, sig, sig, value=-1)).mul_(4)  # through the tanh: 1 - t^2 = 4 s (1 - s)
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:  # summed over chunks in fp32 (bf16 partial sums would lose bits)
                if hc.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved) * grad_loss if ctx.needs_input_grad[0] else None
        grad_w = next(saved) * grad_loss if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


# logits per chunk of the fused head: on CPU 8 MB of fp32 (measured, below); on CUDA 1 GB, where each chunk costs
# ~15 kernel launches and memory is plentiful (3-4 buffers of that size are live at once: z, sig, g and a
# temporary; not yet measured: no GPU was lent to this project)
HEAD_CHUNK_LOGITS = dict(cpu=2 ** 21, cuda=2 ** 28)


def head_loss(h, weight, targets, cap, reduction="mean", chunk=None):
    """Cross-entropy of the softcapped logits of h (..., C) against targets (...), -1 ignored. Training takes the
    fused chunked path (under autocast: bf16 matmuls, fp32 softmax, as autocast would); under torch.compile
    (which fuses the softcap itself) or for reduction='none', the plain one. They agree (tests).
    chunk: rows per chunk; None sizes chunks by HEAD_CHUNK_LOGITS, at least 128 rows (on CPU 256 rows at vocab
    8192: a bench.py training step took 1.17-1.19 s against 1.24-1.25 s with 128-row chunks, whose (128, C) x
    (C, V) products run well under the matmul peak; 384 and 512 rows measured the same as 256). A small
    vocabulary gets one chunk."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    fused = (reduction in ("mean", "sum") and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
             and not torch.compiler.is_compiling())
    if not fused:
        logits = h2 @ weight.t()
        if cap > 0:
            logits = cap * torch.tanh(logits.float() / cap)
        return F.cross_entropy(logits.float(), t2, ignore_index=-1, reduction=reduction)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):  # the casts autocast would make, made explicitly (differentiable)
        low = torch.get_autocast_dtype(device_type)
        h2, weight = h2.to(low), weight.to(low)
    chunk = chunk or max(128, HEAD_CHUNK_LOGITS.get(device_type, HEAD_CHUNK_LOGITS["cpu"]) // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        total = _FusedHeadLoss.apply(h2, weight, t2, float(cap), chunk)
    return total if reduction == "sum" else total / (t2 >= 0).sum()


def repeat_kv(x, n_rep):
    """(B, Hkv, T, D) -> (B, Hkv*n_rep, T, D). Explicit, so GQA works on every torch (no enable_gqa)."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class KVCache:
    """Per-layer key/value cache for generation. Keyword-only so two sizes can never be swapped silently."""

    def __init__(self, *, batch_size, num_heads, seq_len, head_dim, num_layers,
                 device="cpu", dtype=torch.float32, max_gib=64.0):
        sizes = dict(batch_size=batch_size, num_heads=num_heads, seq_len=seq_len,
                     head_dim=head_dim, num_layers=num_layers)
        for name, value in sizes.items():
            if not isinstance(value, numbers.Integral) or value <= 0:
                raise InputError(f"KVCache {name} must be a positive int, got {value!r}")
        gib = 2 * batch_size * num_heads * seq_len * head_dim * num_layers * torch.finfo(dtype).bits / 8 / 2**30
        if gib > max_gib:
            raise InputError(f"KVCache would allocate {gib:.1f} GiB for {sizes}: are two arguments swapped?")
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # used only once a padded chunk arrives (has_pad): which slots hold real tokens, and each row's next position
        self.key_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_pad = False
        self.pos = 0  # number of cache slots written (shared by all rows: prompts are left-padded)
        self.weights = None  # generate(): each layer's matrices as (in, out), made once per call (decode_weights)
        self.shape = shape

    def insert_kv(self, layer, k, v):
        L, B, H, S, D = self.shape
        assert k.shape == v.shape and k.dim() == 4, f"k {tuple(k.shape)} v {tuple(v.shape)}"
        assert (k.shape[0], k.shape[1], k.shape[3]) == (B, H, D), \
            f"KVCache holds (batch={B}, heads={H}, head_dim={D}) but got k of shape {tuple(k.shape)}"
        T = k.shape[2]
        assert self.pos + T <= S, f"KVCache full: {self.pos} + {T} > seq_len {S}"
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        if layer == L - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise InputError(f"GPT shapes: n_embd ({config.n_embd}) must divide by n_head ({config.n_head}) and "
                             f"n_head by n_kv_head ({config.n_kv_head})")
        self.head_dim = config.n_embd // config.n_head
        self.qk_norm, self.norm_eps = config.qk_norm, config.norm_eps
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def qkv_weight(self):
        """The q, k and v projections as one (H + 2 Hkv) * D x C matrix: one matmul instead of three."""
        return torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, w=None):
        """w: this layer's decode_weights (generate); None in training, which concatenates q|k|v every step (its
        backward splits the gradient): that costs less than the two matmuls it saves."""
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = (x @ w["qkv"] if w else F.linear(x, self.qkv_weight())).view(B, T, H + 2 * Hkv, self.head_dim)
        qk = apply_rotary(qkv[:, :, :H + Hkv], cos, sin)  # rotary (+ QK norm) on q and k at once
        if self.qk_norm:
            qk = norm(qk, self.norm_eps)
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv:].transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        n_rep = self.n_head // self.n_kv_head
        if T == 1 and n_rep > 1:
            # one-token decode: fold the query heads that share a kv head into the query length, so the cached
            # K/V are read as they are instead of copied n_rep times every step (same result as repeat_kv)
            q = q.reshape(B, self.n_kv_head, n_rep, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).reshape(B, self.n_head, 1, self.head_dim)
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            # attn_mask=None means plain causal (or a single query that sees every key); never pass both a mask
            # and is_causal=True: the CPU backend rejects the pair
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)
        return y @ w["proj"] if w else self.c_proj(y)


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a hand-written backward (2 * relu(x) * grad): eager autograd runs ~6 elementwise passes
    over the (B, T, 4C) activations for it, which cost more than the MLP's matmuls on CPU."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.mul(r, grad).mul_(2)


def relu_squared(x):
    # torch.compile fuses the plain expression by itself; without autograd (generation) the Function's
    # bookkeeping is pure overhead
    if not torch.is_grad_enabled():
        return F.relu(x).square_()
    if torch.compiler.is_compiling():  # out of place: relu's backward needs its output as it was
        return F.relu(x).square()
    return _ReluSquared.apply(x)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.mlp not in ("relu2", "swiglu"):
            raise InputError(f"GPT mlp must be 'relu2' or 'swiglu', got {config.mlp!r}")
        hidden = config.intermediate_size or 4 * config.n_embd
        self.swiglu = config.mlp == "swiglu"
        # swiglu: the gate and up projections stacked in one matrix (one matmul), gate first
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def act(self, u):
        if self.swiglu:
            gate, up = u.chunk(2, -1)
            return F.silu(gate) * up
        return relu_squared(u)

    def forward(self, x, w=None):
        if w:
            return self.act(x @ w["fc"]) @ w["down"]
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps, config.norm_gains)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps, config.norm_gains)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        w = kv_cache.weights[self.attn.layer_idx] if kv_cache is not None and kv_cache.weights else None
        x = x + self.attn(self.ln_1(x), cos, sin, attn_mask, kv_cache, w)
        return x + self.mlp(self.ln_2(x), w)


class GPT(nn.Module):
    checkpointing = False  # set_checkpointing()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps, config.norm_gains),
        ))
        self.lm_head = self.make_head(config.vocab_size)
        head_dim = config.n_embd // config.n_head
        cos, sin = rotary_table(4 * config.sequence_len, head_dim, config.rope_base, config.rope_llama3)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(init_weights)
        for block in self.transformer.h:  # residual projections start at zero: every block starts as identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    # -- embedding and the vision-token scatter
    def embed(self, idx, vision_embeds=None):
        """Token embeddings, with `vision_embeds` rows written in order where idx == image_token_id."""
        x = self.transformer.wte(idx)
        image_id = self.config.image_token_id
        slots = idx == image_id  # (B, T): where the vision rows go
        n_slots = int(slots.sum()) if image_id >= 0 else 0
        if vision_embeds is not None and vision_embeds.shape[-1] != x.shape[-1]:
            # otherwise reshape(-1, n_embd) below would silently re-cut the rows (e.g. 2x as many, half used)
            raise InputError(f"vision embeddings are {vision_embeds.shape[-1]} wide but the LM's n_embd is "
                             f"{x.shape[-1]} (a missing or mis-sized projector?)")
        n_rows = 0 if vision_embeds is None else vision_embeds.reshape(-1, vision_embeds.shape[-1]).shape[0]
        if n_slots != n_rows:
            raise InputError(f"vision token count mismatch: the prompt has {n_slots} image-token positions "
                             f"(id {image_id}) but {n_rows} vision embeddings were given")
        if n_rows and vision_embeds.dim() == 3 and vision_embeds.shape[0] == idx.shape[0]:
            # (B, N, C): each prompt holds its own N, else the in-order scatter shifts images across prompts
            per_prompt = slots.sum(1).tolist()
            bad = next((i for i, n in enumerate(per_prompt) if n != vision_embeds.shape[1]), None)
            if bad is not None:
                raise InputError(f"vision token count mismatch in prompt {bad}: {per_prompt[bad]} image-token "
                                 f"positions but {vision_embeds.shape[1]} vision embeddings per image")
        if n_rows:
            rows = vision_embeds.reshape(-1, x.shape[-1]).to(x.dtype)
            x = x.masked_scatter(slots.unsqueeze(-1), rows)
        return x

    # -- the transformer on embeddings (so recipes can feed soft/continuous inputs)
    def forward_embeds(self, x, pad_mask=None, kv_cache=None, block=None):
        """x: (B, T, C) -> final hidden states (B, T, C). pad_mask: (B, T) bool, True = real token (left padding).
        block: (B, T) bool, True on tokens that attend to each other both ways (an image, as a prefix-LM like
        PaliGemma); every other token stays causal. Only where the sequence starts (a whole sequence or the
        first prefill of a cache): later tokens cannot reach back into earlier keys' attention."""
        B, T, _ = x.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if block is not None and start > 0:
            raise ValueError(f"block= needs the sequence from position 0; this call starts at {start}")
        padded = pad_mask is not None and not bool(pad_mask.all())
        if not padded and (kv_cache is None or not kv_cache.has_pad):
            # the common path: positions start..start+T, no mask to build (decode steps stay cheap)
            if start + T > self.cos.shape[0]:
                raise InputError(f"position {start + T - 1} exceeds the rotary table ({self.cos.shape[0]})")
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
            attn_mask = None
            if (T > 1 and start > 0) or block is not None:  # chunked prefill (causal with an offset), or a block
                k_idx = torch.arange(start + T, device=x.device)
                attn_mask = (k_idx[None, :] <= k_idx[start:, None])[None, None]
        else:
            cos, sin, attn_mask = self.padded_positions_and_mask(B, T, start, pad_mask, kv_cache, x.device)
        if block is not None:
            block = block if pad_mask is None else block & pad_mask.bool()  # a pad stays invisible
            attn_mask = attn_mask | (block[:, None, :, None] & block[:, None, None, :])
        if self.config.input_norm:
            x = norm(x, self.config.norm_eps)
        for layer in self.transformer.h:
            if self.checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = checkpoint(layer, x, cos, sin, attn_mask, use_reentrant=False)  # recomputed in backward
            else:
                x = layer(x, cos, sin, attn_mask, kv_cache)
        return self.transformer.ln_f(x)

    def padded_positions_and_mask(self, B, T, start, pad_mask, kv_cache, device):
        """Left-padded rows: per-row rotary positions that skip the pads, and a (B, 1, T, S) boolean mask."""
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if pad_mask is None else pad_mask.bool()
        positions = torch.cumsum(valid.long(), 1) - 1
        key_valid = valid
        if kv_cache is not None:
            if not kv_cache.has_pad:  # every earlier row was unpadded: positions so far equal the slot index
                kv_cache.has_pad = True
                kv_cache.next_pos.fill_(start)
            kv_cache.key_valid[:, start:start + T] = valid
            positions = positions + kv_cache.next_pos[:, None]
            kv_cache.next_pos += valid.long().sum(1)
            key_valid = kv_cache.key_valid[:, :start + T]
        positions = positions.clamp(min=0)
        if int(positions.max()) >= self.cos.shape[0]:
            raise InputError(f"position {int(positions.max())} exceeds the rotary table ({self.cos.shape[0]})")
        q_idx = torch.arange(start, start + T, device=device)[:, None]
        k_idx = torch.arange(start + T, device=device)[None, :]
        attn_mask = ((k_idx <= q_idx)[None] & key_valid[:, None, :]) | (k_idx == q_idx)[None]
        # a row always sees itself, so a pad row is never all -inf (no NaN)
        return self.cos[positions], self.sin[positions], attn_mask[:, None]

    def logits(self, h, head=None):
        """head: the lm_head weight as (in, out) from decode_weights (generate); None: the module."""
        logits = (self.lm_head(h) if head is None else h @ head).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None, vision_embeds=None, pad_mask=None, kv_cache=None, loss_reduction="mean"):
        """Returns (logits, loss); targets == -1 are ignored. With targets and grad enabled (training) the loss
        comes from the fused head (head_loss) and logits is None: training never needs the (B, T, V) tensor."""
        h = self.forward_embeds(self.embed(idx, vision_embeds), pad_mask, kv_cache)
        if targets is not None and torch.is_grad_enabled() and loss_reduction != "none":
            return None, head_loss(h, self.lm_head.weight, targets, self.config.logit_softcap, loss_reduction)
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=loss_reduction)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, vision_embeds=None, pad_mask=None, temperature=0.0, top_k=None,
                 eos_id=None, suppress_ids=(), use_cache=True, generator=None):
        """Batched generation. idx: (B, T) prompts, left-padded with pad_mask (B, T) False on pads.
        vision_embeds are scattered once at prefill and reused. The image token and `suppress_ids`
        (other input-only tokens) are never generated. temperature 0 = greedy. Returns (B, <=max_new_tokens);
        rows that stopped at eos_id are filled with eos_id afterwards."""
        B, T = idx.shape
        banned = list(suppress_ids) + ([self.config.image_token_id] if self.config.image_token_id >= 0 else [])
        if pad_mask is None:
            pad_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        cache, head = None, None  # head: the decode-layout lm_head (cached path only)
        if use_cache:
            cfg = self.config
            # under autocast the cache and the packed weights are kept in its dtype: an fp32 cache would be cast
            # whole at every step, and packed fp32 weights (not leaf parameters, so outside autocast's cast cache)
            # cast at every matmul (bf16 decoding on CPU ran at 0.87x of HF's with both)
            dtype = self.lm_head.weight.dtype
            if torch.is_autocast_enabled(idx.device.type):
                dtype = torch.get_autocast_dtype(idx.device.type)
            cache = KVCache(batch_size=B, num_heads=cfg.n_kv_head, seq_len=T + max_new_tokens,
                            head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer, device=idx.device, dtype=dtype)
            cache.weights, head = self.decode_weights(dtype)
        x = self.embed(idx, vision_embeds)
        logits = self.logits(self.forward_embeds(x, pad_mask, cache)[:, -1], head)
        seq, mask, out = idx, pad_mask, []
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, banned, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
            if use_cache:
                h = self.forward_embeds(self.transformer.wte(nxt[:, None]), kv_cache=cache)
            else:  # full recomputation (the reference the cache is tested against)
                seq = torch.cat([seq, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
                h = self.forward_embeds(self.embed(seq, vision_embeds), mask)
            logits = self.logits(h[:, -1], head)
        return torch.stack(out, 1) if out else idx.new_zeros(B, 0)

    def decode_weights(self, dtype=None):
        """generate(): every matrix of a decode step once, shaped (in, out) for `x @ w`, with q|k|v concatenated
        (one matmul instead of three), in `dtype` (default: the weights'). A decode step is matrix-vector products
        bound by memory, and which memory layout CPU GEMV streams faster depends on the matrix: one at least as
        wide as tall (out >= in: q|k|v, the MLP's up projection, the head) is copied to a contiguous (in, out)
        (~25% faster than nn.Linear's (out, in): this bench model's 25 matrices at batch 1, 4.1 -> 3.2 ms); a tall
        one (the MLP's down projection, in = 4 out) stays (out, in) behind a transposed view, one contiguous dot
        product per output (as an (in, out) copy it made the bench's fp32 generation ~11% slower: 184-191 against
        206-215 tok/s, alternating in one process). On GPU every matrix is a transposed view (cuBLAS reads either
        layout), or a transposed copy in another dtype."""
        def pack(w):  # w: (out, in)
            if w.is_cpu and w.shape[0] >= w.shape[1]:
                return torch.empty(w.shape[::-1], dtype=dtype or w.dtype, device=w.device).copy_(w.t())
            return w.to(dtype or w.dtype).t()
        layers = [dict(qkv=pack(b.attn.qkv_weight()), proj=pack(b.attn.c_proj.weight),
                       fc=pack(b.mlp.c_fc.weight), down=pack(b.mlp.c_proj.weight)) for b in self.transformer.h]
        return layers, pack(self.lm_head.weight)

    def resize_token_embeddings(self, new_vocab):
        """Grow (never shrink) the embedding and head, keeping old rows: e.g. adding <|image|> to a text LM."""
        old = self.config.vocab_size
        if new_vocab < old:
            raise InputError(f"cannot shrink vocab from {old} to {new_vocab}")
        if new_vocab == old:
            return
        wte, head = nn.Embedding(new_vocab, self.config.n_embd), self.make_head(new_vocab)
        new = [wte] if self.config.tie_embeddings else [wte, head]  # a tied head has no rows of its own
        for m in new:
            m.to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        for m, old_m in zip(new, [self.transformer.wte, self.lm_head]):
            init_weights(m)
            with torch.no_grad():
                m.weight[:old] = old_m.weight
        self.transformer.wte = wte
        self.lm_head = self.make_head(new_vocab) if self.config.tie_embeddings else head  # tied: to the new rows
        self.config.vocab_size = new_vocab

    def make_head(self, vocab_size):
        if self.config.tie_embeddings:
            return TiedHead(self.transformer.wte)
        return nn.Linear(self.config.n_embd, vocab_size, bias=False)

    def num_params(self, exclude_embedding=False):
        """exclude_embedding: without the token lookup (for FLOPs); a tied matrix still counts, as the head."""
        n = sum(p.numel() for p in self.parameters())
        lookup_only = exclude_embedding and not self.config.tie_embeddings
        return n - self.transformer.wte.weight.numel() if lookup_only else n


def set_checkpointing(module, on=True):
    """Activation checkpointing for every block stack inside `module` (GPT, ViT, and any module with a
    `checkpointing` attribute): each block's activations are dropped after its forward and recomputed in the
    backward (memory for one block's worth of compute). Same gradients."""
    for m in module.modules():
        if hasattr(m, "checkpointing"):
            m.checkpointing = on
    return module


def rotary_table(length, head_dim, base=10000.0, llama3=()):
    """(length, head_dim) tables in apply_rotary's form: cos = [c, c], sin = [s, -s] over the two halves.
    llama3: Llama 3.x's rescaling, which stretches the low frequencies by `factor` and blends the middle band."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if llama3:
        inv_freq = llama3_frequencies(inv_freq, *llama3)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.cos()], -1), torch.cat([freqs.sin(), -freqs.sin()], -1)


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, original_context):
    """Wavelengths longer than original_context / low_freq_factor are divided by factor, shorter than
    original_context / high_freq_factor kept, those between blended linearly in original_context / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original_context / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original_context / high_freq_factor, inv_freq, out)


def init_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.weight.shape[1]))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=1.0)


def sample_next(logits, temperature=0.0, top_k=None, banned=(), generator=None):
    """logits (B, V) -> next ids (B,). Banned ids get -inf before greedy or sampling."""
    logits = logits.clone()
    if banned:
        logits[:, list(banned)] = float("-inf")
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)


def left_pad(seqs, pad_id=0, device="cpu"):
    """List of token lists -> (ids (B, T), pad_mask (B, T)) left-padded, the layout generate() expects."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = True
    return ids.to(device), mask.to(device)

# -----------------------------------------------------------------------------
# ViT with cacheable per-layer patch K/V and query tokens


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    in_chans: int = 3
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    patch_embed: bool = True       # False: forward() takes (B, N, n_embd) tokens (e.g. conv features)
    num_tokens: int = 0            # with patch_embed=False: how many input tokens (for the position table)
    query_mode: str = "deep"       # deep: queries read the patches at every layer; shallow: at the last only
    attn_temperature: float = 1.0  # divides the query->patch attention logits (<1 sharper)
    # what pretrained encoders need (pretrained_vision.py); the defaults are this repo's own ViT
    norm_eps: float = 1e-5
    act: str = "gelu"              # MLP activation: gelu | gelu_tanh (SigLIP) | quick_gelu (CLIP)
    mlp_hidden: int = 0            # 0: 4 * n_embd
    patch_bias: bool = True        # CLIP's patch embedding has no bias
    class_token: bool = False      # a learned token before the patches, with its own slot in the position table
    n_registers: int = 0           # learned tokens after the class token, without positions (DINOv2 with registers)
    pos_grid: int = 0              # side of the position table's patch grid (0: image_size // patch_size)
    pos_interpolate: str = ""      # '' the table as stored | 'bicubic' | 'bicubic_antialias': resized to the input's
                                   #   grid in fp32, align_corners False, class slot untouched (as transformers)
    pre_norm: bool = False         # LayerNorm on the embeddings before the first block (CLIP)
    final_norm: bool = True        # ln_f after the last block (CLIP's hidden states have none)
    image_mean: tuple = (0.5, 0.5, 0.5)  # the input normalisation the weights expect (recipes apply it)
    image_std: tuple = (0.5, 0.5, 0.5)


class QuickGELU(nn.Module):
    def forward(self, x):  # CLIP's sigmoid approximation of GELU
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = dict(gelu=nn.GELU, gelu_tanh=lambda: nn.GELU(approximate="tanh"), quick_gelu=QuickGELU)


class ViTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.norm_eps), nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        # q and v biases but no k bias (as BEiT): q . b_k is the same for every key, so softmax cancels it; as a
        # parameter its gradient is float noise that Adam scales up to full-size steps. A source's k bias is
        # dropped on loading for the same reason (exact: tests compare with transformers)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(c.n_embd)), nn.Parameter(torch.zeros(c.n_embd))
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        if c.act not in ACTIVATIONS:
            raise InputError(f"ViT act must be one of {', '.join(ACTIVATIONS)}, got {c.act!r}")
        hidden = c.mlp_hidden or 4 * c.n_embd
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, hidden), ACTIVATIONS[c.act](), nn.Linear(hidden, c.n_embd))

    def heads(self, x):
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(self.ln_1(x), self.qkv.weight, bias).split(C, dim=-1)
        return [t.view(B, N, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x):
        """Patch tokens attend to patch tokens only. Returns (x, (k, v)) so queries can reuse this layer's K/V."""
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln_2(x)), (k, v)

    def read(self, qx, patch_k, patch_v, temperature=1.0, bias=None, prefix=0, top_k=0, gumbel=False, logps=None):
        """Query tokens attend to [this layer's encoder K/V, themselves]; the encoder never sees the queries.
        Attention is written out (queries are few) so the query->patch map can be returned.
        bias (B, Q, N): added to the query->patch logits (e.g. a location prior), every head. prefix: how many
        encoder tokens (class, registers) come before the N patches; they are read, but not in the bias or map.
        top_k > 0: a hard glimpse, see top_k_attention (logps: a list that gets its log-probability (B, Q))."""
        q, k, v = self.heads(qx)
        keys, values = torch.cat([patch_k, k], 2), torch.cat([patch_v, v], 2)
        scores = (q @ keys.transpose(-2, -1)) / (math.sqrt(q.shape[-1]) * temperature)
        if bias is not None:
            pad = (prefix, scores.shape[-1] - bias.shape[-1] - prefix)
            scores = scores + F.pad(bias, pad)[:, None].to(scores.dtype)
        if top_k:
            att, logp = top_k_attention(scores.float(), prefix, patch_k.shape[2], top_k, gumbel)
            att = att.to(q.dtype)
            if logps is not None:
                logps.append(logp)
        else:
            att = scores.float().softmax(-1).to(q.dtype)
        y = (att @ values).transpose(1, 2).reshape(qx.shape)
        qx = qx + self.proj(y)
        qx = qx + self.mlp(self.ln_2(qx))
        return qx, att[..., prefix:patch_k.shape[2]].mean(1)  # (B, Q, N) head-averaged map over patches


def top_k_attention(scores, start, end, k, gumbel=False):
    """A hard glimpse: softmax over the k patches (scores[..., start:end], picked once for all heads from the
    head-mean scores) and every non-patch key; the other patches get 0. gumbel=True picks the k by Gumbel top-k
    (k draws without replacement from the head-mean softmax: places not yet favoured get tried). Straight-through:
    the value is the hard map, the gradient the full softmax's (every patch's logit learns).
    -> (attention, log-probability (B, Q) of the picks in their order: each pick's share of the head-mean softmax
    over the patches not yet picked (Plackett-Luce, the law of Gumbel top-k): REINFORCE's score)."""
    soft = scores.softmax(-1)
    mean = scores[..., start:end].mean(1, keepdim=True)  # (B, 1, Q, N)
    pick = mean - torch.log(-torch.log(torch.rand_like(mean).clamp(1e-9, 1 - 1e-9))) if gumbel else mean
    order = pick.topk(min(k, end - start), -1).indices  # best first
    chosen = torch.zeros_like(pick, dtype=torch.bool).scatter_(-1, order, True)
    keep = F.pad(chosen, (start, scores.shape[-1] - end), value=True).expand_as(scores)
    hard = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    logp, left = 0.0, mean
    for i in range(order.shape[-1]):
        j = order[..., i:i + 1]
        logp = logp + (left.gather(-1, j) - left.logsumexp(-1, keepdim=True))[..., 0]
        left = left.scatter(-1, j, float("-inf"))
    return soft + (hard - soft).detach(), logp[:, 0]


def embed_patches(images, conv):
    """(B, C, H, W) -> (B, H/p, W/p, D): a patch conv (kernel = stride = p, no padding) as one matmul over the
    flattened patches, with the conv's own weight and bias. The same numbers, but on a CPU mkldnn's strided conv
    and its weight gradient took 2x as long (30 vs 14 ms a step for 32 images of 96 px). Like the conv, a
    remainder of pixels that makes no whole patch is dropped."""
    p = conv.kernel_size[0]
    if conv.stride != conv.kernel_size or conv.padding != (0, 0) or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"embed_patches needs a square kernel = stride and no padding, got {conv}")
    B, C, H, W = images.shape
    x = images[:, :, :H // p * p, :W // p * p].reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, C * p * p)  # (c, dy, dx): the weight's order
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class ViT(nn.Module):
    checkpointing = False  # set_checkpointing()

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        if c.patch_embed:
            self.patch = nn.Conv2d(c.in_chans, c.n_embd, c.patch_size, stride=c.patch_size, bias=c.patch_bias)
            n_tokens = (c.pos_grid or c.image_size // c.patch_size) ** 2
        else:
            n_tokens = c.num_tokens
        self.pos = nn.Parameter(torch.randn(1, int(c.class_token) + n_tokens, c.n_embd) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps) if c.final_norm else nn.Identity()
        self.ln_pre = nn.LayerNorm(c.n_embd, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        if c.n_registers and not c.class_token:
            raise InputError("ViT n_registers sit after the class token: they need class_token=True")
        self.prefix = int(c.class_token) + c.n_registers  # tokens before the patches in every sequence
        if c.class_token:
            self.cls = nn.Parameter(torch.randn(1, 1, c.n_embd) * 0.02)
        if c.n_registers:
            self.registers = nn.Parameter(torch.randn(1, c.n_registers, c.n_embd) * 0.02)

    def positions(self, h, w):
        """The position table for an h x w patch grid: as stored, or its square patch grid resized (class slot
        kept) when pos_interpolate is set and the grid differs."""
        c, k = self.config, int(self.config.class_token)
        n_grid = self.pos.shape[1] - k
        g = math.isqrt(n_grid)
        if h * w == n_grid and (not c.pos_interpolate or (h, w) == (g, g)):
            return self.pos
        if not c.pos_interpolate or g * g != n_grid:
            raise InputError(f"ViT expects {n_grid} patch tokens but got {h * w}")
        if c.pos_interpolate not in ("bicubic", "bicubic_antialias"):
            raise InputError(f"ViT pos_interpolate must be '', 'bicubic' or 'bicubic_antialias', got {c.pos_interpolate!r}")
        grid = self.pos[:, k:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False,
                             antialias=c.pos_interpolate == "bicubic_antialias")
        grid = grid.to(self.pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([self.pos[:, :k], grid], 1)

    def tokens(self, images):
        """images (B, C, H, W), or (B, N, C) tokens with patch_embed=False -> (B, prefix + N, C): [class token,
        registers,] patches, positions added."""
        c = self.config
        if c.patch_embed:
            x = embed_patches(images, self.patch)
            h, w = x.shape[1:3]
            x = x.flatten(1, 2)
        else:
            x = images
            h = w = math.isqrt(x.shape[1])
            if h * w != x.shape[1]:  # a token count that is no square grid: only the table's own length fits
                h, w = 1, x.shape[1]
        pos = self.positions(h, w)
        if c.class_token:
            x = torch.cat([self.cls.expand(len(x), -1, -1).to(x.dtype), x], 1)
        x = x + pos
        if c.n_registers:
            x = torch.cat([x[:, :1], self.registers.expand(len(x), -1, -1).to(x.dtype), x[:, 1:]], 1)
        return self.ln_pre(x)

    def encode(self, images):
        """-> dict(features (B, N, C) final patches (normed unless final_norm=False), hidden (B, prefix + N, C) the
        same with the class/register tokens first, layers [per-layer outputs, prefix included], kv [per-layer
        (k, v) of every token]). Encode a frame once, then read() it with as many query sets as needed."""
        x = self.tokens(images)
        layers, kv = [], []
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x, layer_kv = checkpoint(block, x, use_reentrant=False)  # recomputed in backward
            else:
                x, layer_kv = block(x)
            layers.append(x)
            kv.append(layer_kv)
        hidden = self.ln_f(x)
        return dict(features=hidden[:, self.prefix:], hidden=hidden, layers=layers, kv=kv)

    def hidden_states(self, images):
        """The source's final hidden states (B, tokens, width), class token first where it has one (transformers'
        last_hidden_state for a loaded CLIP, DINOv2 or SigLIP)."""
        return self.encode(images)["hidden"]

    def read(self, queries, cache, temperature=None, bias=None, top_k=0, gumbel=False, logps=None):
        """queries (B, Q, C) -> (outputs (B, Q, C), [attention maps (B, Q, N) over the patches per layer read]).
        bias (B, Q, N): added to the query->patch attention logits at every layer read. top_k > 0: each layer
        reads only its k best patches (gumbel: drawn; see top_k_attention; logps: a list that gets each layer's
        log-probability of its picks (B, Q))."""
        t = self.config.attn_temperature if temperature is None else temperature
        first = 0 if self.config.query_mode == "deep" else len(self.blocks) - 1
        maps = []
        for i in range(first, len(self.blocks)):
            queries, att = self.blocks[i].read(queries, *cache["kv"][i], temperature=t, bias=bias, prefix=self.prefix,
                                               top_k=top_k, gumbel=gumbel, logps=logps)
            maps.append(att)
        return self.ln_f(queries), maps

    def forward(self, images):
        return self.encode(images)["features"]


class Projector(nn.Sequential):
    """Vision width -> LM width: Linear, GELU, Linear (the LLaVA-1.5 / nanoVLM shape)."""

    def __init__(self, in_dim, out_dim, hidden=None):
        hidden = hidden or out_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def gpt_flops_per_token(config, n_params):
    """6N for the matmuls plus attention's 12 * L * H * D * T (PaLM appendix B accounting).
    n_params must exclude the token embedding (a lookup, not a matmul): gpt.num_params(exclude_embedding=True)."""
    head_dim = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_dim * config.sequence_len
