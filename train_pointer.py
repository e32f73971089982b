"""
Pointing with a small VLM at pixel precision: image + text query -> (x, y) of the referred object(s).

ViT -> Projector -> GPT over [bos, query words, image x N, <|point|> ...]. Each <|point|> token scores every
image token (its own q.k, a grounding logit the words give the patch, a direction ramp for "left of ...");
the answer is the best patch's centre + that patch's predicted offset, refined by x_head / y_head
(coordinates in [-1, 1]), and a done head says "no more points". Sequential pointing: the next <|point|>
token carries the previous point (Fourier features). Pixel errors are measured in a frame 384 px tall (384 x 384
for synthetic scenes; a real image's frame keeps its aspect ratio); the image itself is rendered at img_size px.

    python train_pointer.py                                  # synthetic scenes, CPU, <= 10 min
    python train_pointer.py --loss=l1 --max_steps=600        # loss ablation
    python train_pointer.py config/pointer_jsonl.py          # PixMo-Points-like JSONL on a GPU
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config (every key can be overridden: python train_pointer.py config/x.py --key=value)
out_dir = ""                 # '' -> out/pointer-<timestamp>
init_from = "scratch"        # scratch | resume | <checkpoint dir> | hf:owner/name
eval_only = False
seed = 1337
device = "auto"
dtype = "auto"
compile = False
dataset = "synthetic"        # synthetic | jsonl
train_jsonl = ""             # jsonl: {"image": path, "query": str, "points": [[x, y], ...]} per line
val_jsonl = ""
img_size = 96                # rendered/resized image side (px); errors are still measured at 384 px
edge_channels = True         # 4 more input channels, |Sobel| in 4 orientations: summed over a patch they are an
                             #   orientation histogram, so the linear patch embedding sees shape (centre-patch
                             #   shape accuracy 0.47 -> 0.97, <= 5 px 60% -> 86% on one CPU budget)
patch_size = 12
stem = "patch"               # patch: the plain linear patch embedding; conv: 3 strided convs (stride 2, 2, patch/4)
                             #   make the tokens (learned slower here: patch CE 1.7 vs 1.2 at step 300)
vit_layers = 4
vit_embd = 128
vit_heads = 4
n_layer = 3                  # GPT
n_embd = 128
n_head = 4
n_kv_head = 4
image_attention = "causal"   # causal | bidirectional: the image tokens attend to each other both ways (a prefix-LM,
                             #   as PaliGemma; the query before them and the point tokens after stay causal)
input_norm = True            # RMS-normalise the GPT's input embeddings (image tokens and words) before its first
                             #   block. Bidirectional without the norm: 2.02-2.49 px in 3 runs at ~1,150 steps (against
                             #   2.17-5.08 px in 11 of the default), but 1.79-2.49 against 1.66-2.01 px at ~1,700 steps
head_mode = "attend"         # attend: point token attends over image tokens (soft-argmax + offsets) plus
                             #   x_head/y_head refinement; mlp: x_head/y_head of the hidden state alone
direction_bias = True        # attend: the point token adds a learned linear ramp over the patch centres to its
                             #   scores ("left of ...": of the same-colour objects, the leftmost). Side by side, one
                             #   thread, 480 s: relation queries 78% -> 86% <= 5 px, all 88.6% -> 90.8%; alone at the
                             #   full budget 93.2-93.8%, within noise of the 93.0-93.6% before
gate_ramp = True             # attend: the ramp counts only where the grounding logit says "candidate" (ramp x
                             #   sigmoid(match)), so a far object of another colour cannot win on position alone
ground_candidates = True     # relation queries: the grounding (mask) label marks every object of the named colour
                             #   but the reference, not only the target; a patch can tell that locally, and the
                             #   gated ramp picks the extreme candidate. With gate_ramp, alone at the full budget:
                             #   mean < 3 px in 7 of 11 runs (2.17-2.90; 3.32-5.08), against 1 of 5 before; either
                             #   alone was level (notes/pointer.md, sessions 13-14)
max_points = 3               # longest point sequence (multi-target queries)
max_query_len = 48           # query tokens kept
word_tokens = True           # one token per word of the synthetic grammar (unknown words: bytes)
loss = "three_stage"         # three_stage | three_stage_cont | l1 | smooth_l1
done_weight = 0.2            # weight of the done BCE
patch_weight = 1.0           # attend mode: cross-entropy of the point token's attention over image patches
                             #   toward the patch holding the target (0 = off)
mask_weight = 1.0            # attend mode: BCE of a per-image-token "belongs to a referred object" logit (a
                             #   dense grounding label: image tokens read the query, which comes first)
dense_weight = 20.0          # dense scene parsing of EVERY object (synthetic only): per-patch colour/shape/size
                             #   classes on the ViT features + per-patch offset to its object's centre (attend);
                             #   weighted up because shape is what the ViT learns slowest (1 -> 20: <= 5 px 57% -> 79%)
parse_object_weight = 5.0    # dense parsing: a patch an object covers weighs 5 background patches
window = 0                   # attend mode: the answer's soft-argmax only over the (2w+1)^2 patches around the
                             #   best patch; -1 = over all patches. 0 = that patch's centre + offset alone: a
                             #   neighbour holding part of another object no longer pulls the point (near misses
                             #   5.8% -> 2.4%, <= 5 px 84.8% -> 86.8% side by side; alone 90.8% -> 93.6%)
multi_weight = 0.25          # synthetic: share of "every ..." queries among training queries (the other kinds keep
                             #   their ratios; held-out queries are drawn as always)
curriculum_steps = 150       # > 0: training queries are attribute-only (no relations / "every") before this step
train_cluster = 0.3          # synthetic: probability that a training object is placed next to an earlier one
                             #   (overlapped targets: 9% of queries at 0, 30% at 0.3); held-out scenes never are
                             #   (+1.2 to +2.0 points <= 5 px in 3 side-by-side pairs)
augment = False              # translate/scale/flip (synthetic scenes are infinite, so off by default)
max_steps = 2200             # 300-460 ms/step with Muon on a 2-core AMD EPYC (1,000-1,750 steps in 540 s, by the
                             #   machine's speed that day); max_train_seconds caps it
max_train_seconds = 540.0         # > 0: stop training after this many seconds (then eval); LR decays on time too
batch_size = 32
num_workers = 0              # > 0: worker processes build the next batches while the model trains (for GPUs and
                             #   real images; on this 2-core CPU a worker made 120 steps slower, 56-57 s vs 52 s)
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.05
optim = "muon"               # muon: the ViT / GPT / head matrices take Muon (orthogonalised momentum, model.Muon)
                             #   at the same lr, the rest AdamW | adamw: AdamW for all. Side by side, one thread,
                             #   480 s: <= 5 px 92.6 / 93.6% against AdamW's 89.8-92.2% in five runs
grad_clip = 1.0
log_interval = 25
eval_interval = 250
n_eval = 500                 # held-out single-target queries
n_eval_multi = 200           # held-out "every ..." queries, rolled out until done
n_train_eval = 200           # training queries evaluated for the train/val gap
patience = 5                 # early stopping: evals without a better val mean pixel error
n_vis = 8                    # queries drawn in the eval PNG, each kind (0: no PNG)
wandb_log = False
wandb_project = "vlm-pointer"
wandb_run_name = "pointer"
push_to_hub = ''            # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)

from configurator import configure  # noqa: E402
config = configure(globals())

from model import (GPT, GPTConfig, InputError, KVCache, Projector, ViT, ViTConfig, gpt_flops_per_token, left_pad)
from runtime import (WandbLogger, autocast_ctx, budget_lr_step, budget_spent, check_finite, cleanup_distributed,  # noqa: E402
                     configure_optimizers, get_lr, global_mean, grad_norm, init_distributed, install_error_hook,
                     log_line, maybe_compile, mean_across_ranks, measure_matmul_peak, set_lr)
from checkpoint import (adopt_checkpoint_config, check_repo_id, dataclass_from_dict, load_checkpoint, load_meta,  # noqa: E402
                        push_run_to_hub, rng_state, run_dir, save_checkpoint, set_rng_state, unwrap)
from data import (Tokenizer, batch_indices, epoch_order, format_metrics, image_grid, normalize,  # noqa: E402
                  oriented_edges, save_png, step_batches, write_results)
from data_pointer import (POINTER_FRAME, POINTER_KIND_WEIGHTS, POINTER_KINDS, POINTER_LOSSES, POINTER_N_COLOUR, POINTER_N_SHAPE,  # noqa: E402
                          POINTER_N_SIZE, pointer_augment, pointer_curriculum_kinds, pointer_dense_labels, pointer_draw,
                          pointer_encode, pointer_load_record, pointer_parse_accuracy, pointer_patch_mask, pointer_pixel_errors, pointer_pixel_metrics,
                          pointer_read_jsonl, pointer_sequence_metrics, pointer_synthetic_sample, pointer_window_softmax,
                          pointer_word_specials, pointer_error_breakdown)

install_error_hook()
if push_to_hub:
    check_repo_id(push_to_hub)
RECIPE = "pointer"
TARGETS = {"within_5px": (">=", 0.95), "mean_px": ("<", 3.0)}
# the model's shape: a run from a checkpoint takes these from it, and says so (img_size, word_tokens: must match)
MODEL_KEYS = ("patch_size", "stem", "vit_layers", "vit_embd", "vit_heads", "n_layer", "n_embd", "n_head", "n_kv_head",
              "head_mode", "edge_channels", "direction_bias", "gate_ramp", "max_query_len", "max_points",
              "image_attention", "input_norm")
SINGLE_KINDS = tuple(k for k in POINTER_KINDS if k != "multi")
if not 0 <= multi_weight < 1:
    raise InputError(f"multi_weight is a share of the training queries, in [0, 1): got {multi_weight}")
TRAIN_KIND_WEIGHTS = {k: w * (1 - multi_weight) / (1 - POINTER_KIND_WEIGHTS["multi"]) for k, w in POINTER_KIND_WEIGHTS.items()}
TRAIN_KIND_WEIGHTS["multi"] = multi_weight
if loss not in POINTER_LOSSES:
    raise InputError(f"loss must be one of {' | '.join(POINTER_LOSSES)}, got {loss!r}")
if image_attention not in ("bidirectional", "causal"):
    raise InputError(f"image_attention must be 'bidirectional' or 'causal', got {image_attention!r}")
if dataset not in ("synthetic", "jsonl"):
    raise InputError(f"dataset must be 'synthetic' or 'jsonl', got {dataset!r}")

# -----------------------------------------------------------------------------
# the model: ViT -> Projector -> GPT, point token -> x_head / y_head / done_head


def fourier(xy, n_freq=8):
    """(…, 2) in [-1, 1] -> (…, 4 n_freq) sin/cos features: how a point is fed back into the sequence."""
    freqs = (2.0 ** torch.arange(n_freq, device=xy.device, dtype=xy.dtype)) * math.pi / 2
    ang = xy[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)


def input_channels(edges):
    return 3 + 4 * edges + 2  # RGB (+ 4 oriented edges) + 2 coordinates


def coord_channels(images):
    """Two extra input channels holding each pixel's own (x, y) in [-1, 1] (CoordConv): every patch
    embedding then knows exactly where it is, which a learned position table only learns slowly."""
    B, _, H, W = images.shape
    ys = (torch.arange(H, device=images.device, dtype=images.dtype) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=images.device, dtype=images.dtype) + 0.5) / W * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1])
    return torch.cat([images, grid[None].expand(B, 2, H, W)], 1)


def conv_stem(in_chans, n_embd, patch_size, width=24):
    """Image -> (B, N, n_embd) patch tokens through 3 strided convs (total stride = patch_size): local edge and
    corner features at 2x and 4x finer than a patch, so a token knows the shape it holds (a linear patch
    embedding only sees the pixels inside its own 12 x 12 square) at about the same FLOPs."""
    if patch_size % 4:
        raise InputError(f"stem='conv' needs patch_size divisible by 4, got {patch_size}")
    k = patch_size // 4
    return nn.Sequential(nn.Conv2d(in_chans, width, 4, stride=2, padding=1), nn.GELU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                         nn.Conv2d(2 * width, n_embd, k, stride=k), nn.Flatten(2))


def head(n):
    return nn.Sequential(nn.Linear(n, n), nn.GELU(), nn.Linear(n, 1))


class Pointer(nn.Module):
    def __init__(self, vit_cfg, gpt_cfg, point_id, head_mode="attend", window=-1, edges=False, direction=False,
                 gate=False, image_attention="causal"):
        super().__init__()
        self.point_id, self.head_mode, self.window, self.edges = point_id, head_mode, window, edges
        self.direction, self.gate, self.image_attention = direction, gate, image_attention
        if vit_cfg.in_chans != input_channels(edges):
            raise InputError(f"the ViT takes {vit_cfg.in_chans} channels but RGB + {'4 edge + ' if edges else ''}"
                             f"2 coordinate channels make {input_channels(edges)}")
        self.grid = G = vit_cfg.image_size // vit_cfg.patch_size
        self.vit = ViT(vit_cfg)
        # patch_embed=False: the ViT takes tokens, made by the conv stem
        self.stem = None if vit_cfg.patch_embed else conv_stem(vit_cfg.in_chans, vit_cfg.n_embd, vit_cfg.patch_size)
        self.proj = Projector(vit_cfg.n_embd, gpt_cfg.n_embd)
        self.gpt = GPT(gpt_cfg)
        self.gpt.lm_head.requires_grad_(False)  # no text is generated: keeps DDP free of unused parameters
        self.point_in = nn.Linear(32, gpt_cfg.n_embd, bias=False)
        C = gpt_cfg.n_embd
        self.x_head, self.y_head, self.done_head = head(C), head(C), nn.Linear(C, 1)
        # dense scene parsing on the ViT features: colour / shape / size class (+ background) of every patch,
        # so patch features carry the attributes the query words name from the first steps on
        self.parse = nn.Linear(vit_cfg.n_embd, POINTER_N_COLOUR + POINTER_N_SHAPE + POINTER_N_SIZE)
        if head_mode == "attend":
            # the point token's hidden state is a query over the image tokens' final hidden states; the
            # answer is the attention-weighted mean of (patch centre + a per-patch offset predicted from
            # its content), refined by x_head/y_head (which start at zero)
            self.q_proj, self.k_proj = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
            self.offset = nn.Linear(C, 2)
            self.match = nn.Linear(C, 1)  # per image token: "am I part of what the query refers to?"
            # late interaction (word x patch): every query token's final state is dotted with every image
            # token's, summed over the query, so "blue" + "triangle" add up on blue triangles: a direct,
            # shallow path from the words to the patch scores that the patch CE / mask BCE train at once
            self.word_q, self.word_k = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
            # a relation query's target is the extreme object of its colour in the named direction (the only
            # red one left of the reference is the leftmost red one): a score linear in the patch position
            self.ramp = nn.Linear(C, 2, bias=False) if direction else None
            nn.init.zeros_(self.offset.weight), nn.init.zeros_(self.offset.bias)
            if self.ramp is not None:
                nn.init.zeros_(self.ramp.weight)
            for h in (self.x_head, self.y_head):
                nn.init.zeros_(h[-1].weight), nn.init.zeros_(h[-1].bias)
            c = (torch.arange(G, dtype=torch.float32) + 0.5) / G * 2 - 1
            ys, xs = torch.meshgrid(c, c, indexing="ij")  # raster order, like the ViT's patch tokens
            self.register_buffer("centres", torch.stack([xs.flatten(), ys.flatten()], -1), persistent=False)
            self.patch_w = 2.0 / G

    def vision(self, images):
        """-> (projected image tokens (B, N, C_gpt), parse logits (B, N, classes))."""
        x = normalize(images)
        x = coord_channels(torch.cat([x, oriented_edges(x)], 1) if self.edges else x)
        feats = self.vit(x if self.stem is None else self.stem(x).transpose(1, 2))
        return self.proj(feats), self.parse(feats)

    def embed(self, ids, images, feed, feed_mask):
        """Token embeddings with vision rows scattered in and previous points added to their <|point|> tokens."""
        vis, parse = self.vision(images)
        x = self.gpt.embed(ids, vis)
        return x + self.point_in(fourier(feed)) * feed_mask[..., None].to(x.dtype), parse

    def grounding(self, ids, pad_mask, h, img_h):
        """Per image token "is this what the query names?" logits (B, N): its own match logit plus the
        late-interaction sum over the query tokens (the real tokens that are neither image nor point)."""
        is_query = (ids != self.gpt.config.image_token_id) & (ids != self.point_id)
        if pad_mask is not None:
            is_query = is_query & pad_mask.bool()
        words = self.word_q(h) * is_query[..., None].to(h.dtype)  # (B, T, C)
        late = torch.einsum("btc,bnc->bn", words, self.word_k(img_h)) / math.sqrt(h.shape[-1])
        return self.match(img_h).squeeze(-1).float() + late.float()

    def heads(self, h, img_h, row, match=None):
        """h (M, C) hidden states of <|point|> tokens; img_h (B, N, C) image-token hidden states; row (M,)
        the sequence each point token belongs to; match (B, N) grounding logits -> xy (M, 2), done logits
        (M,), patch logits (M, N) or None."""
        xy, logits = torch.cat([self.x_head(h), self.y_head(h)], -1), None
        if self.head_mode == "attend":
            keys = self.k_proj(img_h)[row]  # (M, N, C)
            logits = torch.einsum("mc,mnc->mn", self.q_proj(h), keys).div(math.sqrt(h.shape[-1])).float() + match[row]
            if self.ramp is not None:
                ramp = self.ramp(h).float() @ self.centres.T  # (M, N)
                # gated: the direction only orders the patches the words select (the candidates)
                logits = logits + (ramp * torch.sigmoid(match[row]) if self.gate else ramp)
            targets = self.centres + self.offset(img_h[row]).float() * self.patch_w  # (M, N, 2)
            xy = xy + torch.einsum("mn,mnk->mk", pointer_window_softmax(logits, self.grid, self.window), targets).to(xy.dtype)
        return xy, self.done_head(h).squeeze(-1), logits

    def patch_index(self, xy):
        """The patch (raster index) holding each point: the target of the attention cross-entropy."""
        G = int(round(2.0 / self.patch_w))
        col, r = (((xy + 1) / 2 * G).long().clamp(0, G - 1)).unbind(-1)
        return r * G + col

    def image_block(self, ids):
        """The tokens that attend to each other both ways (forward_embeds' block=): the image, or None (causal)."""
        return ids == self.gpt.config.image_token_id if self.image_attention == "bidirectional" else None

    def image_states(self, ids, h):
        return h[ids == self.gpt.config.image_token_id].view(ids.shape[0], -1, h.shape[-1])

    def forward(self, ids, pad_mask, images, feed, feed_mask):
        """-> dict(xy (M, 2), done (M,) logits, patch (M, N) logits or None, match (B, N) logits or None,
        parse (B, N, classes) logits, offset (B, N, 2) in patch widths or None)."""
        x, parse = self.embed(ids, images, feed, feed_mask)
        h = self.gpt.forward_embeds(x, pad_mask, block=self.image_block(ids))
        is_point = ids == self.point_id
        row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[is_point]
        img_h = self.image_states(ids, h)
        attend = self.head_mode == "attend"
        match = self.grounding(ids, pad_mask, h, img_h) if attend else None  # (B, N), trained by mask_weight
        xy, done, patch = self.heads(h[is_point], img_h, row, match)
        return dict(xy=xy, done=done, patch=patch, parse=parse, match=match,
                    offset=self.offset(img_h).float() if attend else None)


# what a checkpoint from before a switch existed was built with (it does not record the switch)
LEGACY = dict(head_mode="mlp", window=-1, edge_channels=False, direction_bias=False, gate_ramp=False,
              image_attention="causal", input_norm=True)


def build_model(meta):
    vit_cfg = dataclass_from_dict(ViTConfig, meta["vit"])
    gpt_cfg = dataclass_from_dict(GPTConfig, meta["gpt"])
    a = {k: meta.get(k, v) for k, v in LEGACY.items()}
    return Pointer(vit_cfg, gpt_cfg, meta["point_id"], a["head_mode"], a["window"], a["edge_channels"],
                   a["direction_bias"], a["gate_ramp"], a["image_attention"])

# -----------------------------------------------------------------------------
# setup


ddp = init_distributed(device)
master, dev, device_type = ddp["master"], ddp["device"], ddp["device_type"]
torch.manual_seed(seed + ddp["rank"])
np.random.seed(seed + ddp["rank"])
ctx, dtype_name = autocast_ctx(device_type, dtype)
tok = Tokenizer(specials=["<|point|>"] + (pointer_word_specials() if word_tokens else []))
BOS, IMAGE, POINT = tok["<|bos|>"], tok["<|image|>"], tok["<|point|>"]
out_dir = run_dir(out_dir, RECIPE, init_from)  # (under DDP, rank 0's choice on every rank)

if init_from == "scratch":
    if stem not in ("conv", "patch"):
        raise InputError(f"stem must be 'conv' or 'patch', got {stem!r}")
    vit_cfg = ViTConfig(image_size=img_size, patch_size=patch_size, in_chans=input_channels(edge_channels), n_layer=vit_layers,
                        n_head=vit_heads, n_embd=vit_embd, patch_embed=stem == "patch",
                        num_tokens=0 if stem == "patch" else (img_size // patch_size) ** 2)
    gpt_cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                        n_embd=n_embd, sequence_len=2 + (img_size // patch_size) ** 2 + max_query_len + max_points,
                        image_token_id=IMAGE, input_norm=input_norm)
    meta0 = dict(vit=vit_cfg.__dict__, gpt=gpt_cfg.__dict__, point_id=POINT, head_mode=head_mode, word_tokens=word_tokens,
                 window=window, edge_channels=edge_channels, direction_bias=direction_bias, gate_ramp=gate_ramp,
                 image_attention=image_attention)
else:  # resume, a checkpoint dir, or hf:owner/name: the architecture comes from the checkpoint
    meta0 = load_meta(os.path.join(out_dir, "ckpt") if init_from == "resume" else init_from)
    built_as = {k: meta0.get(k, v) for k, v in LEGACY.items()}  # what build_model makes of an older checkpoint
    globals().update(adopt_checkpoint_config(meta0, config, MODEL_KEYS, verbose=master, absent=built_as))
if meta0["vit"]["image_size"] != img_size:
    raise InputError(f"checkpoint was trained at img_size={meta0['vit']['image_size']}, config says {img_size}")
if meta0.get("word_tokens", word_tokens) != word_tokens or meta0["gpt"]["vocab_size"] != tok.vocab_size:
    raise InputError(f"checkpoint was trained with word_tokens={meta0.get('word_tokens')} (vocab "
                     f"{meta0['gpt']['vocab_size']}), config says word_tokens={word_tokens} (vocab {tok.vocab_size})")
model = build_model(meta0).to(dev)
model.window = window  # the answer's window is an inference choice, not a weight: the config always decides
grid = meta0["vit"]["image_size"] // meta0["vit"]["patch_size"]
n_vision = grid * grid
optimizer = configure_optimizers(model, lr, weight_decay, device_type=device_type, optimizer=optim)
step, best_px, bad_evals = 0, float("inf"), 0
seconds_before = dict(train=0.0, budget=0.0)  # what earlier segments of this run used (resume): the clocks continue
if init_from == "resume":
    meta = load_checkpoint(os.path.join(out_dir, "ckpt"), model, optimizer)
    set_rng_state(meta["rng"])
    step, best_px, bad_evals = meta["step"], meta["best_px"], meta["bad_evals"]
    # older checkpoints recorded no time: they resume at 0 s
    seconds_before["train"] = meta.get("train_seconds", 0.0)
    seconds_before["budget"] = meta.get("budget_seconds", seconds_before["train"])
    print(f"resumed {out_dir} at step {step}")
elif init_from != "scratch":
    load_checkpoint(init_from, model)
    print(f"initialised from {init_from}")
raw_model = model
model = maybe_compile(model, compile, device_type)
if ddp["ddp"]:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ddp["local_rank"]] if device_type == "cuda" else None)
n_params = sum(p.numel() for p in raw_model.parameters())
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"out_dir {out_dir} | params {n_params / 1e6:.2f}M | device {dev} {dtype_name} | loss {loss} | "
          f"{n_vision} vision tokens from {img_size}px images, errors measured at {POINTER_FRAME}px")
logger = WandbLogger(wandb_log and master, wandb_project, wandb_run_name, config, out_dir)

# -----------------------------------------------------------------------------
# data: samples -> padded batches


if dataset == "jsonl":
    if not train_jsonl or not val_jsonl:
        raise InputError("dataset='jsonl' needs --train_jsonl=... and --val_jsonl=...")
    train_records, val_records = pointer_read_jsonl(train_jsonl), pointer_read_jsonl(val_jsonl)
    print(f"jsonl: {len(train_records)} train / {len(val_records)} val records")
    for name, recs in (("train", train_records), ("val", val_records)):
        if n_long := sum(len(r["points_px"]) > max_points for r in recs):
            print(f"jsonl: {n_long} {name} records have more than max_points={max_points} points: the model is "
                  f"taught their first {max_points} (reading order); the val metrics count every point")
    if n_eval > len(val_records):
        print(f"n_eval={n_eval} but {val_jsonl} holds {len(val_records)} records: each is evaluated once")
    if not any(r["points_px"] for r in val_records[:n_eval]):
        raise InputError(f"{val_jsonl}: no record among the first {min(n_eval, len(val_records))} has a point: "
                         "there is no pixel error to measure")


def get_sample(split, index, kinds=POINTER_KINDS):
    train = split == "train"
    if dataset == "jsonl" and not train:
        return pointer_load_record(val_records[index % len(val_records)], img_size)
    if dataset == "jsonl":
        epoch, i = divmod(index, len(train_records))
        s = pointer_load_record(train_records[epoch_order(len(train_records), seed, epoch)[i]], img_size)
    else:
        s = pointer_synthetic_sample(seed, split, index, img_size, max_points=max_points, kinds=kinds,
                                     cluster=train_cluster if train else 0.0,
                                     weights=TRAIN_KIND_WEIGHTS if train else POINTER_KIND_WEIGHTS)
    if augment and train:  # real images too (config/pointer_jsonl.py turns it on; it used to reach synthetic only)
        rng = np.random.default_rng([seed, 99, index])
        s["image"], s["points"], s["text"], scale = pointer_augment(s["image"], s["points"], s["text"], rng)
        s["halves"], s["objects"] = s["halves"] * scale, None  # dense labels are not transformed: ignored
        s["cand_points"] = None  # nor are the candidates: the grounding label falls back to the targets
    return s


def prompt_ids(text):
    """[bos, query, image x N, point]: the query comes first so that (causal) image tokens can read it and
    each patch can decide locally whether it belongs to the referred object."""
    q = pointer_encode(tok, text, word_tokens)[:max_query_len]
    return [BOS] + q + [IMAGE] * n_vision + [POINT]


def grounding_label(s):
    """The per-patch target of the grounding logit: the referred objects' patches or, for relation queries with
    ground_candidates, every candidate's (the words select them; the relation then picks one)."""
    if ground_candidates and s.get("kind") == "relation" and s.get("cand_points") is not None:
        return pointer_patch_mask(s["cand_points"], s["cand_halves"], grid)
    return pointer_patch_mask(s["points"][:max_points], s["halves"][:max_points], grid)


def collate(samples):
    """Teacher-forced sequences: K target points -> K + 1 <|point|> tokens (the last says done); token j > 0
    carries point j - 1. Left padding keeps every sequence's point tokens at the end."""
    seqs, feeds, xy, done = [], [], [], []
    for s in samples:
        pts = np.asarray(s["points"], dtype=np.float32).reshape(-1, 2)[:max_points]
        seqs.append(prompt_ids(s["text"]) + [POINT] * len(pts))
        feeds.append(pts)
        xy.append(pts)
        done.append([0.0] * len(pts) + [1.0])
    ids, pad_mask = left_pad(seqs, pad_id=tok["<|pad|>"])
    B, T = ids.shape
    feed, feed_mask = torch.zeros(B, T, 2), torch.zeros(B, T, dtype=torch.bool)
    for b, pts in enumerate(feeds):  # point j feeds the (j+1)-th <|point|> token, which sits len(pts)-j from the end
        for j, p in enumerate(pts):
            feed[b, T - len(pts) + j] = torch.from_numpy(p)
            feed_mask[b, T - len(pts) + j] = True
    return dict(ids=ids, pad_mask=pad_mask, images=torch.stack([s["image"] for s in samples]), feed=feed,
                feed_mask=feed_mask, xy=torch.from_numpy(np.concatenate([np.concatenate([p, np.zeros((1, 2), np.float32)]) for p in xy])),
                done=torch.tensor([d for ds in done for d in ds]),
                mask=torch.from_numpy(np.stack([grounding_label(s) for s in samples])),
                dense=torch.from_numpy(np.stack([pointer_dense_labels(s.get("objects"), grid) for s in samples])))


def make_batch(step):
    """Step -> this rank's training batch (CPU tensors): a pure function of the step (and seed, rank)."""
    idx = batch_indices(step, batch_size, ddp["rank"], ddp["world_size"])
    return collate([get_sample("train", i, pointer_curriculum_kinds(step, curriculum_steps)) for i in idx])


def compute_loss(batch):
    with ctx:
        out = model(batch["ids"], batch["pad_mask"], batch["images"], batch["feed"], batch["feed_mask"])
    xy, done_logit, patch_logits, match = out["xy"].float(), out["done"].float(), out["patch"], out["match"]
    has_point = batch["done"] < 0.5
    n_point = has_point.sum()
    # masked means are re-weighted to the global batch (global_mean), so DDP matches one process exactly
    coord = global_mean(POINTER_LOSSES[loss](xy[has_point], batch["xy"][has_point]) * n_point, n_point, dev)
    # every point token (the done ones too) over the global batch: ranks hold different numbers of them
    done_bce = global_mean(F.binary_cross_entropy_with_logits(done_logit, batch["done"], reduction="sum"),
                           batch["done"].numel(), dev)
    parts = dict(coord=coord, done=done_bce)
    if patch_logits is not None and patch_weight > 0:
        parts["patch"] = global_mean(F.cross_entropy(patch_logits[has_point], raw_model.patch_index(batch["xy"][has_point]),
                                                     reduction="sum"), n_point, dev)
    if match is not None and mask_weight > 0:
        parts["mask"] = F.binary_cross_entropy_with_logits(match, batch["mask"])
    dense = batch["dense"]
    if dense_weight > 0 and (dense[..., 2] >= 0).any():
        # every object of every scene supervises the patches it covers: what it is, and where its centre lies
        cls = dense[..., 2:].long()
        logits = out["parse"].float().split([POINTER_N_COLOUR, POINTER_N_SHAPE, POINTER_N_SIZE], -1)
        # object patches weigh `parse_object_weight` background patches: most patches are background, which is
        # learned in a few steps, and would otherwise drown the slow part (telling a circle from a square)
        w = (1.0 + (parse_object_weight - 1.0) * (cls[..., 0] != POINTER_N_COLOUR - 1).float()) * (cls[..., 0] >= 0).float()
        parts["parse"] = sum(global_mean((F.cross_entropy(lg.reshape(-1, lg.shape[-1]), cls[..., i].reshape(-1), ignore_index=-1,
                                                          reduction="none") * w.reshape(-1)).sum(), w.sum(), dev)
                             for i, lg in enumerate(logits)) / 3
        has_off = ~torch.isnan(dense[..., 0])
        if out["offset"] is not None and has_off.any():
            parts["offset"] = global_mean((out["offset"][has_off] - dense[..., :2][has_off]).abs().sum(), has_off.sum(), dev)
    total = (coord + done_weight * done_bce + patch_weight * parts.get("patch", 0.0) + mask_weight * parts.get("mask", 0.0)
             + dense_weight * (parts.get("parse", 0.0) + parts.get("offset", 0.0)))
    return total, parts

# -----------------------------------------------------------------------------
# evaluation: rolled-out points (the first point for single-target queries; the whole sequence for
# "every ..." queries, fed back point by point with a KV cache until done), never teacher-forced


@torch.no_grad()
def rollout(m, samples, max_len):
    """-> list of (K_i, 2) predicted point sequences (stopping when done > 0.5, at least one point)."""
    ids, pad_mask = left_pad([prompt_ids(s["text"]) for s in samples], pad_id=tok["<|pad|>"])
    ids, pad_mask = ids.to(dev), pad_mask.to(dev)
    images = torch.stack([s["image"] for s in samples]).to(dev)
    B, T = ids.shape
    cfg = m.gpt.config
    cache = KVCache(batch_size=B, num_heads=cfg.n_kv_head, seq_len=T + max_len, head_dim=cfg.n_embd // cfg.n_head,
                    num_layers=cfg.n_layer, device=dev, dtype=getattr(torch, dtype_name))  # autocast's: no per-step cast
    with ctx:
        x = m.gpt.embed(ids, m.vision(images)[0])
        h_all = m.gpt.forward_embeds(x, pad_mask, cache, block=m.image_block(ids))
    h, img_h, rows = h_all[:, -1], m.image_states(ids, h_all), torch.arange(B, device=dev)
    match = m.grounding(ids, pad_mask, h_all, img_h) if m.head_mode == "attend" else None
    out, stopped = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=dev)
    for j in range(max_len):
        xy, done_logit, _ = m.heads(h, img_h, rows, match)
        xy = xy.float().clamp(-1, 1)
        stop = (done_logit.float() > 0) & (j > 0)
        stopped |= stop
        for b in range(B):
            if not stopped[b]:
                out[b].append(xy[b].cpu().numpy())
        if bool(stopped.all()) or j == max_len - 1:
            break
        with ctx:
            x = m.gpt.transformer.wte(torch.full((B, 1), POINT, device=dev)) + m.point_in(fourier(xy))[:, None]
            h = m.gpt.forward_embeds(x, kv_cache=cache)[:, -1]
    return [np.stack(o) for o in out]


@torch.no_grad()
def evaluate():
    """-> (metrics, PNG grid or None, dict(n_eval=, n_eval_multi=): how many queries were measured)."""
    m = unwrap(model)
    m.eval()
    t0 = time.time()
    if dataset == "jsonl":  # real data: single- and multi-point records come from one file, each record once
        val = [get_sample("val", i) for i in range(min(n_eval, len(val_records)))]
        single, multi = [s for s in val if len(s["points"]) == 1], [s for s in val if len(s["points"]) > 1]
    else:
        single = [get_sample("val", i, SINGLE_KINDS) for i in range(n_eval)]
        multi = [get_sample("val", 10**6 + i, ("multi",)) for i in range(n_eval_multi)]
    # the pixel metrics are on single-point queries; a val file with none: on the first point (reading order) of
    # the multi-point ones. Records without points (nothing to point at) only train the done head.
    pix = single or multi
    measured = (lambda s: len(s["points"]) == 1) if single else (lambda s: len(s["points"]) > 0)
    train = [s for s in (get_sample("train", i, SINGLE_KINDS) for i in range(n_train_eval)) if measured(s)]
    chunk = 100
    run = lambda ss, L: [p for i in range(0, len(ss), chunk) for p in rollout(m, ss[i:i + chunk], L)]
    pred1 = run(pix, 1)
    first, truth, frames = (np.stack([p[0] for p in pred1]), np.stack([s["points"][0] for s in pix]),
                            np.array([s["frame"] for s in pix]))
    metrics = pointer_pixel_metrics(first, truth, frames)
    kinds = np.array([s["kind"] for s in pix])
    err_ok = pointer_pixel_errors(first, truth, frames) <= 5
    for k in SINGLE_KINDS if dataset == "synthetic" else ():  # which query kinds fail (grounding vs precision)
        if (kinds == k).any():
            metrics[f"within_5px_{k}"] = float(err_ok[kinds == k].mean())
    # grounding failures vs imprecision, by target size and occlusion (synthetic scenes only; what the ViT can
    # tell apart: parse_acc below)
    metrics.update(pointer_error_breakdown(first, pix))
    if train:
        # train vs held-out error. Synthetic: training scenes are crowded (train_cluster) and held-out ones never
        # are, so gap_px is not overfitting alone: harder training scenes push it down (it is often negative)
        train_pred = run(train, 1)
        train_m = pointer_pixel_metrics(np.stack([p[0] for p in train_pred]), np.stack([s["points"][0] for s in train]),
                                        np.array([s["frame"] for s in train]))
        metrics["train_mean_px"] = train_m["mean_px"]
        metrics["gap_px"] = metrics["mean_px"] - train_m["mean_px"]
    pred_multi = []
    if multi:
        pred_multi = run(multi, max_points + 1)
        metrics.update(pointer_sequence_metrics(pred_multi, [s["points"] for s in multi], [s["frame"] for s in multi]))
    # the training loss on held-out queries (for the curve only; it is not an error measure)
    batch = collate(pix[:200])
    with ctx:
        out = m(*(batch[k].to(dev) for k in ("ids", "pad_mask", "images", "feed", "feed_mask")))
    keep = batch["done"] < 0.5
    metrics["val_loss"] = POINTER_LOSSES[loss](out["xy"].float().cpu()[keep], batch["xy"][keep]).item()
    metrics.update(pointer_parse_accuracy(out["parse"].cpu(), batch["dense"]))  # {} without labels (real data)
    metrics["eval_seconds"] = time.time() - t0
    vis = [pointer_draw(s["image"], p[:1], s["points"][:1], s["text"], frame=s["frame"]) for s, p in zip(single[:n_vis], pred1)]
    vis += [pointer_draw(s["image"], p, s["points"], s["text"], frame=s["frame"]) for s, p in zip(multi[:n_vis], pred_multi)]
    m.train()
    return metrics, image_grid(vis, 4) if vis else None, dict(n_eval=len(pix), n_eval_multi=len(multi))


def save(name, extra=None):
    # meta0 is what build_model made the model from: writing it back keeps one list of the architecture's keys
    # train_seconds: the steps' own time (results.json); budget_seconds: the wall clock the time budget and the
    # LR schedule run on (evals included), so that a resumed run continues both
    meta = dict(meta0, recipe=RECIPE, step=step, config=config, rng=rng_state(), best_px=best_px, bad_evals=bad_evals,
                window=raw_model.window, train_seconds=train_seconds, budget_seconds=time.time() - t_start,
                **(extra or {}))
    save_checkpoint(os.path.join(out_dir, name), raw_model, optimizer, meta=meta)


def eval_and_report(train_seconds, head_norms, at_step=None, **fields):
    """Eval, print, PNG, results.json, wandb. Returns the val mean pixel error. at_step: the step the weights
    come from (the best checkpoint's after an early stop), default the current one."""
    at_step = step if at_step is None else at_step
    metrics, grid, counts = evaluate()
    metrics.update(head_norms)
    print(f"eval step {at_step} | " + format_metrics(metrics, TARGETS))
    png = save_png(grid, os.path.join(out_dir, f"points_step{at_step:05d}.png")) if grid is not None else None
    write_results(out_dir, RECIPE, "val", counts["n_eval"], metrics, TARGETS, step=at_step,
                  train_seconds=round(train_seconds, 1), device=dev, dtype=dtype_name, params=n_params, config=config,
                  n_eval_multi=counts["n_eval_multi"], frame_px=POINTER_FRAME, img_size=img_size, **fields)
    logger.log({f"val/{k}": v for k, v in metrics.items()}, at_step, images={"points": png})
    return metrics["mean_px"]


if eval_only:
    if master:
        eval_and_report(0.0, {})
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop


peak = measure_matmul_peak(dev) if master else None
gpt_flops = gpt_flops_per_token(raw_model.gpt.config, raw_model.gpt.num_params(exclude_embedding=True))
vit_flops = 6 * sum(p.numel() for p in raw_model.vit.parameters()) * n_vision
head_norms, train_seconds, stop_reason = {}, seconds_before["train"], "max_steps"
t_start = time.time() - seconds_before["budget"]
batches = step_batches(make_batch, step, max_steps, num_workers, pin_memory=device_type == "cuda")
while step < max_steps:
    t0 = time.time()
    sched_step = budget_lr_step(step, max_steps, t0 - t_start, max_train_seconds, dev)  # LR decays on time too
    set_lr(optimizer, get_lr(sched_step, max_steps, lr, warmup_steps, min_lr_frac))
    batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
    total, parts = compute_loss(batch)
    check_finite(total, step)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if (step + 1) % log_interval == 0 or step == 0:  # head gradient norms (the journal watched these for explosions)
        head_norms = {f"grad_{n}": grad_norm(getattr(raw_model, n)) for n in ("x_head", "y_head", "done_head")}
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    step += 1
    dt = time.time() - t0
    train_seconds += dt
    if step % log_interval == 0 or step == 1:
        loss_avg = mean_across_ranks(total.item(), dev)  # the global batch's loss (every rank joins)
    if master and (step % log_interval == 0 or step == 1):
        extra = " | ".join(f"{k} {v.item():.4f}" for k, v in parts.items()) + " | " + " ".join(f"{k} {v:.3f}" for k, v in head_norms.items())
        # FLOPs of this batch's padded length (bos + query + image + point tokens), the ViT's per image
        flops = batch["ids"].shape[0] * (gpt_flops * batch["ids"].shape[1] + vit_flops)
        print(log_line(step, max_steps, loss_avg, optimizer.param_groups[0]["lr"], dt,
                       tokens=batch["ids"].numel(), flops_per_step=flops, peak=peak, extra=extra))
    out_of_time = budget_spent(time.time() - t_start, max_train_seconds, dev)  # every rank agrees before the eval
    if master and (step % eval_interval == 0 or step == max_steps or out_of_time):
        px = eval_and_report(train_seconds, head_norms)
        if px < best_px:
            best_px, bad_evals = px, 0
            save("best", dict(head_norms=head_norms))  # the gradient norms as they were at this step
        else:
            bad_evals += 1
        save("ckpt")
        if bad_evals >= patience:
            stop_reason = f"early stop: val mean pixel error has not improved for {patience} evals"
    if ddp["ddp"]:  # every rank stops together
        flag = torch.tensor([stop_reason != "max_steps" or out_of_time], device=dev)
        torch.distributed.broadcast(flag, 0)
        out_of_time = out_of_time or bool(flag)
    if stop_reason != "max_steps" or out_of_time:
        stop_reason = stop_reason if stop_reason != "max_steps" else f"time budget {max_train_seconds:.0f}s reached"
        break

if master:
    print(f"done: {stop_reason} at step {step}, {train_seconds:.0f}s of training, best val mean {best_px:.2f}px")
    if stop_reason.startswith("early stop"):  # report the best checkpoint, not the last, and the step it is from
        best = load_checkpoint(os.path.join(out_dir, "best"), raw_model)
        eval_and_report(train_seconds, best.get("head_norms", head_norms), at_step=best["step"], stopped_at_step=step)
if master and push_to_hub:  # the checkpoint the final report came from
    push_run_to_hub(push_to_hub, out_dir, RECIPE, config, 'best' if stop_reason.startswith('early stop') else 'ckpt')
logger.finish()
model = unwrap(model)  # drop the DDP wrapper first: it holds the process group, which must not outlive teardown
cleanup_distributed()
