"""
Pointing with a small VLM at pixel precision: image + text query -> (x, y) of the referred object(s).

ViT -> Projector -> GPT over [bos, query words, image x N, <|point|> ...]. Each <|point|> token scores every
image token (its own q.k, a grounding logit the words give the patch, a direction ramp for "left of ...");
the answer is the best patch's centre + that patch's predicted offset, refined by x_head / y_head
(coordinates in [-1, 1]), and a done head says "no more points". Sequential pointing: the next <|point|>
token carries the previous point (Fourier features). Pixel errors are in the image's own pixels (mean_px, ...;
a synthetic scene is 384 x 384), with the same figures beside in a frame 384 px tall (mean_px384, ...; a real
image's frame keeps its aspect ratio); the image itself is rendered at img_size px.
Targets: within_5px >= 0.95 and mean_px < 3.0 on held-out synthetic queries. Notes and records: notes/pointer.md.

    python train_pointer.py                                  # synthetic scenes, CPU, 1700 steps
    python train_pointer.py config/pointer_synthetic.py      # the same on a 540 s training budget
    python train_pointer.py --loss=l1 --max_steps=600        # loss ablation
    python train_pointer.py config/pointer_jsonl.py          # PixMo-Points-like JSONL on a GPU
    torchrun --standalone --nproc_per_node=2 train_pointer.py   # DDP: batch_size per rank
    python train_pointer.py --init_gpt=hf:HuggingFaceTB/SmolLM2-135M --word_tokens=False   # a pretrained LLM
"""
import dataclasses
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure
from runtime import install_error_hook

install_error_hook()

# -----------------------------------------------------------------------------
# config (every key can be overridden: python train_pointer.py config/x.py --key=value)
out_dir = ""                 # '' -> out/pointer-<timestamp>
init_from = "scratch"        # scratch | resume | <checkpoint dir> | hf:owner/name
eval_only = False
seed = 1337
device = "auto"
dtype = "auto"
compile = False
torch_threads = 0            # 0: auto (OMP_NUM_THREADS, else the cores divided among this node's processes)
dataset = "synthetic"        # synthetic | jsonl
train_jsonl = ""             # jsonl: {"image": path, "query": str, "points": [[x, y], ...]} per line
val_jsonl = ""
img_size = 96                # rendered/resized image side (px); errors are measured in the original image's px
edge_channels = True         # 4 more input channels, |Sobel| in 4 orientations: summed over a patch they are an
                             #   orientation histogram, so the linear patch embedding sees shape
coord_channels = True        # 2 more input channels holding each pixel's own (x, y) in [-1, 1] (CoordConv)
vit_init = ""                # a transformers vision encoder (dir or hf:owner/name; CLIP, DINOv2, SigLIP): its weights,
                             #   its patch embedding on RGB alone and its normalisation (set edge_channels=False,
                             #   coord_channels=False); patch_size and vit_* must agree with it
patch_size = 12
stem = "patch"               # patch: the plain linear patch embedding; conv: 3 strided convs (stride 2, 2, patch/4)
vit_layers = 4
vit_embd = 128
vit_heads = 4
n_layer = 3                  # GPT
n_embd = 128
n_head = 4
n_kv_head = 4
init_gpt = ""                # a pretrained LLM (dir or hf:owner/name: this repo's GPT, nanochat, Llama family): its
                             #   weights, shape (n_layer, n_embd, n_head, n_kv_head, input_norm) and tokenizer, the
                             #   recipe's special tokens appended; '' = a GPT from scratch
image_attention = "causal"   # causal | bidirectional: the image tokens attend to each other both ways (a prefix-LM,
                             #   as PaliGemma; the query before them and the point tokens after stay causal)
input_norm = True            # RMS-normalise the GPT's input embeddings (image tokens and words) before its first block
head_mode = "attend"         # attend: point token attends over image tokens (soft-argmax + offsets) plus
                             #   x_head/y_head refinement; mlp: x_head/y_head of the hidden state alone
direction_bias = True        # attend: the point token adds a learned linear ramp over the patch centres to its
                             #   scores ("left of ...": of the same-colour objects, the leftmost)
gate_ramp = True             # attend: the ramp counts only where the grounding logit says "candidate" (ramp x
                             #   sigmoid(match)), so a far object of another colour cannot win on position alone
ground_candidates = True     # relation queries: the grounding (mask) label marks every object of the named colour
                             #   but the reference, not only the target; the gated ramp picks the extreme candidate
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
                             #   weighted up because shape is what the ViT learns slowest
parse_object_weight = 5.0    # dense parsing: a patch an object covers weighs 5 background patches
window = 0                   # attend mode: the answer's soft-argmax only over the (2w+1)^2 patches around the
                             #   best patch; -1 = over all patches. 0 = that patch's centre + offset alone: a
                             #   neighbour holding part of another object cannot pull the point
multi_weight = 0.25          # synthetic: share of "every ..." queries among training queries (the other kinds keep
                             #   their ratios; held-out queries are drawn as always)
curriculum_steps = 150       # > 0: training queries are attribute-only (no relations / "every") before this step
train_cluster = 0.3          # synthetic: probability that a training object is placed next to an earlier one
                             #   (more overlapped targets); held-out scenes never are
augment = False              # translate/scale/flip (synthetic scenes are infinite, so off by default)
max_steps = 1700             # step-exact default: about what a 2-core CPU trains in 540 s
max_train_seconds = 0.0      # > 0: opt-in cap on training seconds (then eval); the LR then decays on time too
batch_size = 32              # per rank and micro-batch
grad_accum_steps = 1         # micro-batches per step: a step trains on batch_size * grad_accum_steps samples per rank
activation_checkpointing = False  # recompute each ViT / GPT block in the backward: less memory, ~1/3 more compute
plan = False                 # print the memory plan (two traced steps: runtime.MemoryPlan), then stop
plan_gpu_gib = 0.0           # the GPU size the plan fits the batch to (0: the visible GPU, else 80 GiB)
num_workers = 0              # > 0: worker processes build the next batches while the model trains (GPUs, real images)
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.05
optim = "muon"               # muon: the ViT / GPT / head matrices take Muon (orthogonalised momentum) at the same
                             #   lr, the rest AdamW | adamw: AdamW for all
grad_clip = 1.0
log_interval = 25
eval_interval = 250          # and at the end
n_eval = 500                 # held-out single-target queries
n_eval_multi = 200           # held-out "every ..." queries, rolled out until done
n_train_eval = 200           # training queries evaluated for the train/val gap
patience = 5                 # early stopping: evals without a better val mean pixel error
n_vis = 8                    # queries drawn in the eval PNG, each kind (0: no PNG)
wandb_log = False
wandb_project = "vlm-pointer"
wandb_run_name = "pointer"
push_to_hub = ""             # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
config = configure(globals())

from model import (GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, gpt_flops_per_token,  # noqa: E402
                   set_checkpointing)
from runtime import (Clock, Logger, check_finite, configure_optimizers, get_lr, global_mean, grad_norm,  # noqa: E402
                     log_line, mean_across_ranks, set_lr, setup, sync_grads, teardown, wrap,
                     MemoryPlan, kv_cache_bytes, plan_probe)
from checkpoint import (adopt_checkpoint_config, dataclass_from_dict, load_checkpoint, push_run_to_hub,  # noqa: E402
                        rng_state, save_checkpoint, set_rng_state, unwrap)
from data_pointer import (POINTER_FRAME, POINTER_KINDS, POINTER_LOSSES, POINTER_N_COLOUR, POINTER_N_SHAPE,  # noqa: E402
                          POINTER_N_SIZE, PointerData, pointer_check_config, pointer_eval_picture, pointer_first_point_metrics,
                          pointer_fourier, pointer_input_channels, pointer_model_input, pointer_parse_accuracy,
                          pointer_parse_weights, pointer_rollout, pointer_sequence_metrics, pointer_specials,
                          pointer_window_softmax)

RECIPE = "pointer"
TARGETS = {"within_5px": (">=", 0.95), "mean_px": ("<", 3.0)}
# the model's shape: a run from a checkpoint takes these from it, and says so (img_size, word_tokens: must match)
MODEL_KEYS = ("patch_size", "stem", "vit_layers", "vit_embd", "vit_heads", "n_layer", "n_embd", "n_head", "n_kv_head",
              "head_mode", "edge_channels", "coord_channels", "direction_bias", "gate_ramp", "max_query_len",
              "max_points", "image_attention", "input_norm")
# what a checkpoint from before a switch existed was built with (it does not record the switch)
LEGACY = dict(head_mode="mlp", window=-1, edge_channels=False, coord_channels=True, direction_bias=False,
              gate_ramp=False, image_attention="causal", input_norm=True)
pointer_check_config(config)  # bad settings: one-line errors before anything starts
run = setup(config, RECIPE, MODEL_KEYS, absent=lambda meta: {k: meta.get(k, v) for k, v in LEGACY.items()})
globals().update(config)  # out_dir and the keys a checkpoint imposes
device, master, ctx = run.device, run.master, run.ctx
logger = Logger(run, RECIPE, config, wandb_log, wandb_project, wandb_run_name)

# -----------------------------------------------------------------------------
# the model: ViT -> Projector -> GPT, point token -> x_head / y_head / done_head


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
                 gate=False, image_attention="causal", coords=True):
        super().__init__()
        self.point_id, self.head_mode, self.window, self.edges, self.coords = point_id, head_mode, window, edges, coords
        self.direction, self.gate, self.image_attention = direction, gate, image_attention
        if vit_cfg.in_chans != pointer_input_channels(edges, coords):
            raise InputError(f"the ViT takes {vit_cfg.in_chans} channels but RGB{' + 4 edge' if edges else ''}"
                             f"{' + 2 coordinate' if coords else ''} channels make {pointer_input_channels(edges, coords)}")
        self.grid = G = vit_cfg.image_size // vit_cfg.patch_size
        self.vit = ViT(vit_cfg)
        # patch_embed=False: the ViT takes tokens, made by the conv stem
        self.stem = None if vit_cfg.patch_embed else conv_stem(vit_cfg.in_chans, vit_cfg.n_embd, vit_cfg.patch_size)
        self.proj = Projector(vit_cfg.n_embd, gpt_cfg.n_embd)
        self.gpt = GPT(gpt_cfg)
        if not gpt_cfg.tie_embeddings:  # no text is generated: keeps DDP free of unused parameters (a tied head
            self.gpt.lm_head.requires_grad_(False)  # is the token embedding itself, which the prompt trains)
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
        c = self.vit.config
        x = pointer_model_input(images, self.edges, self.coords, c.image_mean, c.image_std)
        feats = self.vit(x if self.stem is None else self.stem(x).transpose(1, 2))
        return self.proj(feats), self.parse(feats)

    def embed(self, ids, images, feed, feed_mask):
        """Token embeddings with vision rows scattered in and previous points added to their <|point|> tokens."""
        vis, parse = self.vision(images)
        x = self.gpt.embed(ids, vis)
        return x + self.point_in(pointer_fourier(feed)) * feed_mask[..., None].to(x.dtype), parse

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


def build_model(meta):
    vit_cfg = dataclass_from_dict(ViTConfig, meta["vit"])
    gpt_cfg = dataclass_from_dict(GPTConfig, meta["gpt"])
    a = {k: meta.get(k, v) for k, v in LEGACY.items()}
    return Pointer(vit_cfg, gpt_cfg, meta["point_id"], a["head_mode"], a["window"], a["edge_channels"],
                   a["direction_bias"], a["gate_ramp"], a["image_attention"], a["coord_channels"])

# -----------------------------------------------------------------------------
# data: synthetic scenes or JSONL records -> teacher-forced padded batches (data_pointer.PointerData)

# the tokenizer: a loaded LLM's own (init_gpt; a run from a checkpoint of such a run reloads it from the source its
# meta names) with the recipe's special tokens appended; else data.Tokenizer
SPECIALS = pointer_specials(word_tokens) + ["<|image|>", "<|pad|>"]
llm, tok, vocab = None, None, None  # vocab: the model's rows (a loaded LLM may have more than its tokenizer's ids)
if init_gpt and not run.ckpt_src:  # (pretrained.py only then: a fork of this recipe runs without it)
    import pretrained
    llm, tok, _ = pretrained.load_gpt(init_gpt)
    pretrained.add_special_tokens(llm, tok, SPECIALS)
    GPT_SHAPE = ("n_layer", "n_embd", "n_head", "n_kv_head", "input_norm")  # the source's, printed where they differ
    adopt_checkpoint_config(dict(config={k: getattr(llm.config, k) for k in GPT_SHAPE}), config, GPT_SHAPE, master)
    globals().update({k: config[k] for k in GPT_SHAPE})
    vocab = llm.config.vocab_size
elif run.ckpt_src and run.meta.get("gpt_source"):
    import pretrained
    tok, vocab = pretrained.own_tokenizer(run.meta), run.meta["gpt"]["vocab_size"]
data = PointerData(config, img_size // patch_size, tok, vocab)
grid, n_vision = data.grid, data.n_vision
vit_src = None
if vit_init and not run.ckpt_src:  # (pretrained_vision only then)
    from pretrained_vision import load_vision, recipe_vit_config
    vit_src = load_vision(vit_init)

# -----------------------------------------------------------------------------
# model and optimizer

if run.ckpt_src:  # resume, a checkpoint dir, or hf:owner/name: the architecture comes from the checkpoint
    meta0 = run.meta
else:
    if vit_src:  # the source's shapes at this run's image size; RGB alone, normalised as the source was trained
        vit_cfg = recipe_vit_config(vit_src[1], vit_init, img_size, patch_size, vit_embd, vit_layers, vit_heads)
    else:
        vit_cfg = ViTConfig(image_size=img_size, patch_size=patch_size, n_layer=vit_layers, n_head=vit_heads,
                            in_chans=pointer_input_channels(edge_channels, coord_channels), n_embd=vit_embd,
                            patch_embed=stem == "patch", num_tokens=0 if stem == "patch" else n_vision)
    if llm:  # the loaded LLM's own config (its vocabulary grown by the specials), its image token the recipe's
        gpt_cfg = dataclasses.replace(llm.config, image_token_id=data.image)
    else:
        gpt_cfg = GPTConfig(vocab_size=data.tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                            n_embd=n_embd, sequence_len=2 + n_vision + max_query_len + max_points,
                            image_token_id=data.image, input_norm=input_norm)
    meta0 = dict(vit=vit_cfg.__dict__, gpt=gpt_cfg.__dict__, point_id=data.point, head_mode=head_mode,
                 word_tokens=word_tokens, window=window, edge_channels=edge_channels, direction_bias=direction_bias,
                 gate_ramp=gate_ramp, image_attention=image_attention, coord_channels=coord_channels,
                 specials=SPECIALS)  # what rebuilds the tokenizer (pretrained.own_tokenizer): these specials after
    if llm:                          # data.Tokenizer's, or after the LLM's own tokenizer, read from its source
        meta0["gpt_source"] = init_gpt
data.check_checkpoint(meta0)
raw_model = build_model(meta0).to(device)
raw_model.window = window  # the answer's window is an inference choice, not a weight: the config always decides
if llm and not run.ckpt_src:
    raw_model.gpt.load_state_dict(llm.state_dict())
if vit_src:
    raw_model.vit.load_state_dict(vit_src[0].state_dict())
llm = vit_src = None  # the weights now live in raw_model
set_checkpointing(raw_model, activation_checkpointing)
n_params = sum(p.numel() for p in raw_model.parameters())
optimizer = configure_optimizers(raw_model, lr, weight_decay, device_type=run.device_type, optimizer=optim)
step, clock = 0, Clock(max_train_seconds, device=device)
best_px, bad_evals = float("inf"), 0  # early stopping on the val mean pixel error
if run.ckpt_src:
    meta = load_checkpoint(run.ckpt_src, raw_model, optimizer if run.resume else None)
    if run.resume or eval_only:
        step, clock.seconds = meta.get("step", 0), meta.get("train_seconds", 0.0)
    if run.resume:
        set_rng_state(meta["rng"])
        # ckpt is written before its eval, so that eval's verdict is read from "best" (written when an eval improves)
        best_path = os.path.join(out_dir, "best", "meta.json")
        best = json.load(open(best_path)) if os.path.exists(best_path) else {}
        best_px, bad_evals = (best["best_px"], 0) if best.get("step") == step else (meta["best_px"], meta["bad_evals"] + 1)
        print(f"resumed {out_dir} at step {step}")
    else:
        print(f"initialised from {init_from}")
model = wrap(raw_model, compile and not plan, run)  # compile, then DDP
planner = MemoryPlan(run, raw_model, optimizer, batch_size, grad_accum_steps, plan_gpu_gib,
                     kv_cache_bytes(raw_model.gpt.config, n_eval_multi, raw_model.gpt.config.sequence_len,
                                    2 if run.dtype == 'bfloat16' else 4),
                     activation_checkpointing) if plan else None
if master:
    print(f"out_dir {out_dir} | params {n_params / 1e6:.2f}M | device {device} {run.dtype} | loss {loss} | "
          f"{n_vision} vision tokens from {img_size}px images, errors in image px and at a {POINTER_FRAME}px frame")


def loss_counts(micro):
    """This rank's denominators of the masked means over a step's micro-batches (global_mean adds the other ranks'),
    so that k micro-batches of b weigh every point, token and patch as one batch of k * b does."""
    n = lambda f: sum(f(b) for b in micro)
    return dict(point=n(lambda b: (b["done"] < 0.5).sum()), done=n(lambda b: b["done"].numel()),
                parse=n(lambda b: pointer_parse_weights(b["dense"], parse_object_weight).sum()),
                offset=n(lambda b: (~torch.isnan(b["dense"][..., 0])).sum()), batches=len(micro))


def compute_loss(batch, counts):
    """One micro-batch's share of the step's loss (counts: loss_counts of the step's micro-batches)."""
    with ctx:
        out = model(batch["ids"], batch["pad_mask"], batch["images"], batch["feed"], batch["feed_mask"])
    xy, done_logit, patch_logits, match = out["xy"].float(), out["done"].float(), out["patch"], out["match"]
    has_point = batch["done"] < 0.5
    # masked means are re-weighted to the global batch (global_mean), so DDP matches one process exactly
    coord = global_mean(POINTER_LOSSES[loss](xy[has_point], batch["xy"][has_point]) * has_point.sum(), counts["point"],
                        device)
    # every point token (the done ones too) over the global batch: ranks hold different numbers of them
    done_bce = global_mean(F.binary_cross_entropy_with_logits(done_logit, batch["done"], reduction="sum"),
                           counts["done"], device)
    parts = dict(coord=coord, done=done_bce)
    if patch_logits is not None and patch_weight > 0:
        parts["patch"] = global_mean(F.cross_entropy(patch_logits[has_point], raw_model.patch_index(batch["xy"][has_point]),
                                                     reduction="sum"), counts["point"], device)
    if match is not None and mask_weight > 0:  # every micro-batch (and rank) holds as many patches
        parts["mask"] = F.binary_cross_entropy_with_logits(match, batch["mask"]) / counts["batches"]
    dense = batch["dense"]
    if dense_weight > 0 and (dense[..., 2] >= 0).any():
        # every object of every scene supervises the patches it covers: what it is, and where its centre lies
        cls = dense[..., 2:].long()
        logits = out["parse"].float().split([POINTER_N_COLOUR, POINTER_N_SHAPE, POINTER_N_SIZE], -1)
        w = pointer_parse_weights(dense, parse_object_weight)
        parts["parse"] = sum(global_mean((F.cross_entropy(lg.reshape(-1, lg.shape[-1]), cls[..., i].reshape(-1), ignore_index=-1,
                                                          reduction="none") * w.reshape(-1)).sum(), counts["parse"], device)
                             for i, lg in enumerate(logits)) / 3
        has_off = ~torch.isnan(dense[..., 0])
        if out["offset"] is not None and has_off.any():
            parts["offset"] = global_mean((out["offset"][has_off] - dense[..., :2][has_off]).abs().sum(), counts["offset"],
                                          device)
    total = (coord + done_weight * done_bce + patch_weight * parts.get("patch", 0.0) + mask_weight * parts.get("mask", 0.0)
             + dense_weight * (parts.get("parse", 0.0) + parts.get("offset", 0.0)))
    return total, parts


def save(step, name="ckpt", **extra):
    # meta0 is what build_model made the model from: writing it back keeps one list of the architecture's keys
    meta = dict(meta0, recipe=RECIPE, step=step, config=config, rng=rng_state(), best_px=best_px, bad_evals=bad_evals,
                window=raw_model.window, train_seconds=clock.seconds, **extra)
    save_checkpoint(os.path.join(out_dir, name), raw_model, optimizer, meta=meta)


@torch.no_grad()
def evaluate(step, **fields):
    """Rolled-out answers on held-out queries (the first point of single-target queries; the whole sequence of
    "every ..." queries) -> the metrics, printed, written and logged. Returns the val mean pixel error.
    step: the step the weights come from (the best checkpoint's after an early stop)."""
    raw_model.eval()
    t0 = time.time()
    single, multi, train = data.eval_sets()
    pix = single or multi  # the pixel metrics: single-point queries, else the first point of multi-point ones
    roll = lambda ss, L: [p for i in range(0, len(ss), 100)
                          for p in pointer_rollout(raw_model, data, ss[i:i + 100], L, ctx, run.dtype, device)]
    pred1 = roll(pix, 1)
    metrics = pointer_first_point_metrics(pred1, pix, [k for k in POINTER_KINDS if k != "multi"] if dataset == "synthetic" else ())
    if train:
        # train vs held-out error. Synthetic: training scenes are crowded (train_cluster) and held-out ones never
        # are, so gap_px is not overfitting alone: harder training scenes push it down (it is often negative)
        metrics["train_mean_px"] = pointer_first_point_metrics(roll(train, 1), train)["mean_px"]
        metrics["gap_px"] = metrics["mean_px"] - metrics["train_mean_px"]
    pred_multi = roll(multi, max_points + 1) if multi else []
    if multi:
        metrics.update(pointer_sequence_metrics(pred_multi, [s["points"] for s in multi],
                                                [s["image_wh"] for s in multi], [s["frame"] for s in multi]))
    # the training loss on held-out queries (for the curve only; it is not an error measure)
    batch = data.collate(pix[:200])
    with ctx:
        out = raw_model(*(batch[k].to(device) for k in ("ids", "pad_mask", "images", "feed", "feed_mask")))
    keep = batch["done"] < 0.5
    metrics["val_loss"] = POINTER_LOSSES[loss](out["xy"].float().cpu()[keep], batch["xy"][keep]).item()
    metrics.update(pointer_parse_accuracy(out["parse"].cpu(), batch["dense"]))  # {} without labels (real data)
    metrics["eval_seconds"] = time.time() - t0
    metrics.update(head_norms)
    png = pointer_eval_picture(os.path.join(out_dir, f"points_step{step:05d}.png"), single, pred1, multi, pred_multi, n_vis)
    raw_model.train()
    logger.eval(step, metrics, TARGETS, diagnostics=("median_px", "mean_px384", "wrong_object", "near_miss",
                                                     "seq_precision_5px", "seq_recall_5px"), images={"points": png}, n_eval=len(pix),
                train_seconds=round(clock.seconds, 1), params=n_params, n_eval_multi=len(multi),
                frame_px=POINTER_FRAME, img_size=img_size, **fields)
    return metrics["mean_px"]


head_norms = {}  # gradient norms of the heads, a diagnostic in the log line and the eval's metrics
if eval_only:
    if master:
        evaluate(step)
    teardown(logger)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop

peak = run.matmul_peak() if master else None
gpt_flops = gpt_flops_per_token(raw_model.gpt.config, raw_model.gpt.num_params(exclude_embedding=True))
vit_flops = 6 * sum(p.numel() for p in raw_model.vit.parameters()) * n_vision
stop_reason = ""
batches = data.batches(step, max_steps, run.rank, run.world_size, pin_memory=run.device_type == "cuda")
while step < max_steps:
    clock.start()
    lr_now = get_lr(clock.lr_step(step, max_steps), max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    micro = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()} for _ in range(grad_accum_steps)]
    counts = loss_counts(micro)
    total, parts = 0.0, {}  # the step's loss: the micro-batches' shares summed
    for m, batch in enumerate(micro):
        with sync_grads(model, m, grad_accum_steps), plan_probe(planner):  # DDP reduces the gradients once, in the last backward
            share, share_parts = compute_loss(batch, counts)
            check_finite(share, step)
            share.backward()
        total = total + share.detach()
        parts = {k: parts.get(k, 0.0) + v.detach() for k, v in share_parts.items()}
    if (step + 1) % log_interval == 0 or step == 0:  # before clipping: an exploding head shows here
        head_norms = {f"grad_{n}": grad_norm(getattr(raw_model, n)) for n in ("x_head", "y_head", "done_head")}
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if planner and planner.done():
        break
    dt = clock.stop()
    out_of_time = clock.spent()  # every rank agrees
    last = step == max_steps or out_of_time
    if step % log_interval == 0 or step == 1:
        loss_avg = mean_across_ranks(total.item(), device)  # the global batch's loss (every rank joins)
        if master:
            losses = {k: v.item() for k, v in parts.items()}
            extra = " | ".join(f"{k} {v:.4f}" for k, v in losses.items()) + " | " + " ".join(f"{k} {v:.3f}" for k, v in head_norms.items())
            # FLOPs of each micro-batch's padded length (bos + query + image + point tokens), the ViT's per image
            flops = sum(b["ids"].shape[0] * (gpt_flops * b["ids"].shape[1] + vit_flops) for b in micro)
            print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens=sum(b["ids"].numel() for b in micro),
                           flops_per_step=flops, peak=peak, extra=extra))
            logger.log(dict(loss=loss_avg, lr=lr_now, **losses, **head_norms), step)
    if step % eval_interval == 0 or last:
        if master:
            save(step)  # checkpoint FIRST: a failing eval never loses training
            px = evaluate(step)
            if px < best_px:
                best_px, bad_evals = px, 0
                save(step, "best", head_norms=head_norms)  # the gradient norms as they were at this step
            else:
                bad_evals += 1
        early = torch.tensor([master and bad_evals >= patience], device=device)
        if run.ddp:  # rank 0 decided: every rank stops with it
            torch.distributed.broadcast(early, 0)
        if bool(early):
            stop_reason = f"early stop: val mean pixel error has not improved for {patience} evals"
            break
    if out_of_time:
        stop_reason = f"time budget {max_train_seconds:.0f}s reached"
        break

if master:
    print(f"done: {stop_reason or 'max_steps'} at step {step}, {clock.seconds:.0f}s of training, "
          f"best val mean {best_px:.2f}px")
    if stop_reason.startswith("early stop"):  # report the best checkpoint, not the last, and the step it is from
        best = load_checkpoint(os.path.join(out_dir, "best"), raw_model)
        head_norms = best.get("head_norms", head_norms)
        evaluate(best["step"], stopped_at_step=step)
        if push_to_hub:  # the checkpoint the report came from (teardown would push the last one, ckpt)
            push_run_to_hub(push_to_hub, out_dir, RECIPE, config, "best")
            push_to_hub = ""
model = unwrap(model)  # drop the DDP wrapper before teardown: it holds the process group
teardown(logger, push_to_hub)
