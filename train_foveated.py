"""
Foveated video VLM: does looking where an LLM predicts beat looking with one learned static query?

    python train_foveated.py                                   # synthetic 'track' task, 2-core CPU, <= 15 min
    python train_foveated.py --task=static_large               # control: a large static target (ratio ~1)
    python train_foveated.py --query_mode=shallow --attn_temperature=0.1 --n_passes=2   # ablations
    python train_foveated.py config/foveated_video.py          # GPU scale: real clips + TAESD latents
    python train_foveated.py --oracle_look=True                # diagnostic: the fine reads are shown the target

Every frame is encoded ONCE by a shared ViT whose per-layer patch K/V are cached; query tokens then read
the cache (deep: at every layer; shallow: after the last), one query feature per frame.
  pass 1 (coarse): the learned q_static reads every frame -> GPT -> a predicted query per frame
  pass 2 (fine):   shifted queries [q_init, q_1, ..., q_{T-1}] read the frames -> GPT -> the next frame's latent
  (n_passes > 1 repeats pass 2, each time with queries predicted from the previous fine pass; recurrent=True
  reads frame by frame, each query from the fine reads before it)
loss = fine + coarse (+ caption cross-entropy in captioning mode; + read_weight x the reads' own-frame loss;
+ look_weight x both paths' -log attention mass on the target, synthetic training only: where to look is taught,
never given at eval, and the prediction loss alone never taught it);
detach_coarse=True stops the fine loss at the predicted queries: it never reaches the baseline's own weights
(q_static, proj) or flows back through the coarse pass, though the weights both paths share (ViT, GPT, heads,
frame_pos) learn from both losses; the mode (video-only / text-conditioned / captioning) is drawn per batch.
The hypothesis is ratio = loss_coarse / loss_fine > 1 on held-out videos. Each path predicts frame t+1 as
read_head(its read of frame t) + the GPT's change (read_skip), so a read that holds the target helps at once.
The synthetic latent target is the next frame's target layer (the tracked sprite alone) on a spatial grid, among
moving look-alike distractors: see data_foveated.py for why a global whole-frame target cannot show a gain.
"""
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import install_error_hook
install_error_hook()
from model import GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, left_pad  # noqa: E402
from runtime import (WandbLogger, autocast_ctx, budget_lr_step, budget_spent, check_finite, cleanup_distributed,  # noqa: E402
                     configure_optimizers, get_lr, global_mean, init_distributed, log_line, maybe_compile,
                     mean_across_ranks, measure_matmul_peak, set_lr)
from checkpoint import (adopt_checkpoint_config, check_repo_id, dataclass_from_dict, load_checkpoint, load_meta,  # noqa: E402
                        push_run_to_hub, resolve_checkpoint, rng_state, run_dir, save_checkpoint, set_rng_state,
                        unwrap)
from data import Tokenizer, batch_indices, format_metrics, normalize, save_png, write_results  # noqa: E402
from data_foveated import (FOV_TASKS, fov_attention_stats, fov_attention_strip, fov_check_clip,  # noqa: E402
                           fov_clip_split, fov_cosine, fov_folder_batch, fov_hollow_warnings, fov_latent_encoder,
                           fov_list_clips, fov_look_loss, fov_per_frame_mse, fov_pick_mode, fov_synthetic_batch,
                           fov_synthetic_captions, fov_target_hit, fov_target_patches)

# -----------------------------------------------------------------------------
# config (defaults = config/foveated_synthetic.py: the 2-core CPU run)
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
# data
task = 'track'             # 'track' (small mover among distractors) | 'static_large' (control) | 'folder'
data_dir = ''              # task='folder': captions.json + clip.npy / clip/ frames
n_frames = 8
image_size = 32
n_distractors = 3
noise = 0.04
cue_frames = 3             # the target is outlined in the first frames only (3: its velocity shows, 3-5 px)
p_change = 0.1             # per-frame chance that each sprite switches colour (the fine path's irreducible error)
center_start = True        # track: the target starts mid-frame, then moves with momentum
specks = 1                 # flickering random pixels per frame (unpredictable clutter)
jitter = 0.5               # std (px/frame, per axis) of each sprite's random velocity kick per frame. 0 (pure momentum)
                           # leaves almost nothing to look for: dead reckoning from the cue predicts nearly as well,
                           # so even with the target's place given (--oracle_look) the ratio reached only 1.16 there,
                           # against 1.61 at 0.5 (notes/foveated.md)
latent_encoder = 'fixed'   # 'fixed' (seeded random high-pass filters) | path/to/taesd_encoder.safetensors
latent_target = 'target_layer'  # what position t predicts, through the frozen encoder:
                           # 'target_layer': frame t+1 with only the target drawn (on black), at a spatial grid:
                           #   where the tracked object will be and what it will look like (synthetic only)
                           # 'delta': z(t+1) - z(frame 0) of the whole frame | 'frame': z(t+1) of the whole frame
latent_channels = 8
latent_grid = 2            # latent pooled to grid x grid cells (1: position-invariant)
# encoder: shared ViT, per-layer patch K/V cached, queries read it
patch_size = 4             # 8x8 patches of 4 px: a read can isolate the 4 px target (8 px patches, with
                           # cue_frames=2, had not learned the cue 1000 steps in: loss 1.06, the mean's)
vit_layers = 3
vit_heads = 4
vit_width = 64
coord_channels = True      # append fixed sin/cos x,y channels so keys carry position from step 0
query_mode = 'deep'        # 'deep' (read at every layer) | 'shallow' (read the last layer only)
attn_temperature = 0.1     # divides the query->patch logits (< 1 sharper)
query_dim = 32
glimpse = False            # True: the last (image_size // patch_size)^2 numbers of a query are a location map, logits
                           # over the patch grid whose log-softmax (+ log N: a flat map adds nothing) is added to the
                           # read's query->patch logits at every layer, so where to look is one linear map of the GPT
                           # state away (needs query_dim > N). Tried as the default (query_dim 96): the fine maps did
                           # not learn to find the target in ~1400 steps (mass on its patches 0.02-0.04, uniform
                           # 0.05) and both paths stayed at the mean; off by default (notes/foveated.md)
freeze_vit = False         # needs vit_init (a frozen random ViT is refused)
vit_init = ''              # checkpoint dir whose model.safetensors holds 'vit.*' weights (a pretrained ViT)
# LLM
n_layer = 2
n_head = 4
n_embd = 128
# the next three are on because they let a path use what it reads: with the target's place given (--oracle_look)
# the fine path led 1.61 with them; without them the static path was still at the mean after 1519 steps (hollow)
fine_proj = True           # True: the fine reads enter the GPT through their own Projector (the coarse ones: proj)
read_weight = 1.0          # > 0: both paths' reads of frame t must also give frame t's own latent through one shared
                           # linear head (a short gradient path to "what is here", the same for both paths)
read_skip = True           # True: the prediction of frame t+1 adds read_head(read of frame t) to the GPT's latent_head:
                           # the GPT learns the change from what the read sees now (both paths alike)
look_weight = 1.0          # synthetic only, training only: + look_weight x -log(attention mass on the target's patches)
                           # for the reads of BOTH paths (the same objective; one static query simply cannot follow
                           # a mover). The prediction loss alone never taught the predicted queries where to look
                           # (10 signals tried, notes/foveated.md); the generator knows where the target is, as the
                           # OCR renderer knows its glyphs. Eval never sees a position. 0 = the journal's setting
n_passes = 1               # fine passes (each re-predicts the queries from the previous fine pass)
oracle_look = False        # DIAGNOSTIC (synthetic only), never a result: the fine reads get the target's true
                           # patches as a location prior (-8 on every other patch): what perfect looking buys
recurrent = False          # True: frame t's fine query comes from the GPT state after the FINE reads of frames < t
                           # (a tracker's loop, frame by frame; equals n_passes = n_frames at ~one pass's cost)
detach_coarse = True       # the fine loss stops at the predicted queries and never flows back through the coarse
                           # pass (its reads, the GPT on them) to the baseline's own weights (q_static, proj); the
                           # shared ViT, GPT, heads and frame_pos still learn from both losses, so the baseline is a
                           # static query on weights both paths shape. False (the journal's joint training) learned
                           # less reliably in 600 s default runs: coarse/fine 0.882 / 0.876 against the mean 1.146
                           # (ratio 1.006) in one, 0.194 / 0.190 (1.018) in another; True: 0.160 / 0.160 (0.996)
mode_weights = (0.6, 0.2, 0.2)   # video-only, text-conditioned, captioning; drawn per batch
caption_tokens = 40        # caption budget (longer captions are an error)
n_caption_eval = 64        # held-out videos captioned (generated) at each eval
# training
max_steps = 4000
max_train_seconds = 600.0   # > 0: wall-clock budget of the training loop; the LR decays on steps or time,
                            # whichever is further along, then the final eval runs (0 = steps only, reproducible)
batch_size = 16
lr = 2e-3
min_lr_frac = 0.1
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 50
eval_interval = 1000
n_eval = 256
eval_batch = 64
n_vis = 3                  # videos drawn in the attention strip PNG (0: no PNG)
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'foveated'
push_to_hub = ''            # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
if push_to_hub:
    check_repo_id(push_to_hub)

RECIPE = 'foveated'
TARGETS = {"ratio": (">=", 1.15), "entropy_gap": (">", 0.0)}  # entropy_gap = coarse - fine attention entropy
# the model's weights' shape: a run from a checkpoint takes these from it, and says so (the data's shape, e.g.
# image_size or n_frames, and the read settings, query_mode / attn_temperature, stay the config's: build_model)
MODEL_KEYS = ("vit_layers", "vit_heads", "vit_width", "coord_channels", "query_dim", "glimpse", "n_layer", "n_head",
              "n_embd", "fine_proj", "read_skip", "recurrent")
MODES = ("video", "text", "caption")
tok = Tokenizer()
BOS, EOS, PAD, IMG = tok['<|bos|>'], tok['<|eos|>'], tok['<|pad|>'], tok['<|image|>']

if task not in FOV_TASKS + ('folder',):
    raise InputError(f"task must be one of {FOV_TASKS + ('folder',)}, got {task!r}")
if query_mode not in ('deep', 'shallow'):
    raise InputError(f"query_mode must be 'deep' or 'shallow', got {query_mode!r}")
if n_passes < 1:
    raise InputError(f"n_passes must be >= 1, got {n_passes}")
if oracle_look and task == 'folder':
    raise InputError("oracle_look=True needs the synthetic generator's target positions (task='track' or "
                     "'static_large')")
if look_weight > 0 and task == 'folder':
    raise InputError("look_weight > 0 needs the synthetic generator's target positions; set look_weight=0 for "
                     "task='folder'")
if recurrent and n_passes > 1:
    raise InputError(f"recurrent=True is one fine pass whose queries come from its own state (the fixed point of "
                     f"n_passes); set n_passes=1, got {n_passes}")
if task == 'folder' and not data_dir:
    raise InputError("task='folder' needs data_dir=<folder with captions.json and clips>")
if latent_target not in ('target_layer', 'delta', 'frame'):
    raise InputError(f"latent_target must be 'target_layer', 'delta' or 'frame', got {latent_target!r}")
if latent_target == 'target_layer' and task == 'folder':
    raise InputError("latent_target='target_layer' needs the synthetic generator's target layer; real clips "
                     "(task='folder') take 'delta' or 'frame'")
if image_size % patch_size:
    raise InputError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
if n_frames < 2:  # position t predicts frame t+1: one frame leaves nothing to predict (the loss was NaN)
    raise InputError(f"n_frames must be >= 2 (each frame predicts the next), got {n_frames}")
if latent_grid < 1 or latent_channels < 1:  # 0 made an empty latent and a NaN loss
    raise InputError(f"latent_grid and latent_channels must be >= 1, got {latent_grid} and {latent_channels}")
if n_eval < 1 or not 0 <= n_vis <= n_eval:  # the attention strip draws held-out videos 0..n_vis-1 of the eval
    raise InputError(f"need n_eval >= 1 and 0 <= n_vis <= n_eval, got n_eval={n_eval}, n_vis={n_vis}")
if freeze_vit and not vit_init and init_from == 'scratch':
    raise InputError("freeze_vit=True needs vit_init=<checkpoint dir with a pretrained ViT>: a frozen random ViT "
                     "would never learn to see")
fov_pick_mode(seed, 0, mode_weights, MODES)  # bad mode_weights fail here, not at the first step

# -----------------------------------------------------------------------------
# the model: shared ViT + static/predicted queries + GPT over one feature per frame


def coord_planes(size, n_freq=2):
    """Fixed (4 * n_freq, size, size) sin/cos planes of x and y: patch keys carry their position."""
    r = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    planes = [f(math.pi * (2 ** k) * c) for c in (xx, yy) for k in range(n_freq) for f in (torch.sin, torch.cos)]
    return torch.stack(planes)


class FoveatedVLM(nn.Module):
    def __init__(self, vit_cfg, gpt_cfg, query_dim, latent_dim, coord_channels=True, max_frames=16, glimpse=False,
                 fine_proj=False, read_skip=False, recurrent=False, detach_coarse=True, read_weight=0.0,
                 look_weight=0.0, latent_target='frame'):
        super().__init__()
        self.glimpse = glimpse
        # training settings, not the weights' shape (so never in the checkpoint's "foveated" meta): see the config
        self.detach_coarse, self.read_weight, self.look_weight = detach_coarse, read_weight, look_weight
        self.latent_target = latent_target
        self.n_patches = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
        if glimpse and query_dim <= self.n_patches:
            raise InputError(f"glimpse=True uses the last {self.n_patches} numbers of a query as its location map "
                             f"(one per patch), so query_dim must exceed {self.n_patches}; got {query_dim}")
        self.vit = ViT(vit_cfg)
        self.gpt = GPT(gpt_cfg)
        # BUG-001: queries at std 1.0 (0.02 made every query read the same uniform average)
        self.q_static = nn.Parameter(torch.randn(1, query_dim))
        self.q_init = nn.Parameter(torch.randn(1, query_dim))  # the fine query of frame 0 (no history yet)
        # BUG-002: no bias, so the projected query is the query's own signal, never a shared offset
        self.query_input_proj = nn.Linear(query_dim, vit_cfg.n_embd, bias=False)
        self.proj = Projector(vit_cfg.n_embd, gpt_cfg.n_embd)
        # fine_proj: the fine reads enter the GPT through their own projector (they hold other things than the
        # static query's reads: one object, not a summary of the frame)
        self.proj_fine = Projector(vit_cfg.n_embd, gpt_cfg.n_embd) if fine_proj else None
        # absolute frame index for both passes: rotary is relative only, and the coarse rows (one query for every
        # frame) would otherwise leave the GPT guessing which frame it is at, a handicap that is not foveation's
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, gpt_cfg.n_embd))
        self.query_head = nn.Linear(gpt_cfg.n_embd, query_dim)
        self.latent_head = nn.Linear(gpt_cfg.n_embd, latent_dim)
        self.read_head = nn.Linear(vit_cfg.n_embd, latent_dim)  # read of frame t -> latent of frame t (read_weight)
        self.read_skip = read_skip
        self.recurrent = recurrent  # fine queries from the fine pass's own state, frame by frame (a tracker's loop)
        nn.init.normal_(self.query_head.weight, std=gpt_cfg.n_embd ** -0.5)  # predicted queries ~ std 1 too
        nn.init.zeros_(self.query_head.bias)
        self.coord_channels = coord_channels
        if coord_channels:
            self.register_buffer("coords", coord_planes(vit_cfg.image_size), persistent=False)
        # latent standardisation (computed once from training videos; saved with the weights)
        self.register_buffer("lat_mean", torch.zeros(latent_dim))
        self.register_buffer("lat_std", torch.ones(latent_dim))

    # -- encode once, read many times
    def encode(self, frames):
        """frames (B, T, 3, H, W) in [0, 1] -> the per-layer K/V cache of all B*T frames. Shallow mode keeps
        only the last layer's K/V (the other slots are None): the two layouts every path must accept."""
        x = normalize(frames.flatten(0, 1))
        if self.coord_channels:
            x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1)
        kv = self.vit.encode(x)["kv"]
        if self.vit.config.query_mode == "shallow":
            kv = [None] * (len(kv) - 1) + [kv[-1]]
        return dict(kv=kv, n_frames=frames.shape[1])

    def read(self, cache, queries, temperature=None, look=None):
        """queries (B, T, query_dim), one per frame -> features (B, T, C), attention (B, T, N) averaged
        over the layers read (deep: all, shallow: the last). look (B, T, N) bool: the oracle_look diagnostic's
        location prior (0 on those patches, -8 on the others)."""
        check_cache(cache, self.vit.config.query_mode)
        B, T, _ = queries.shape
        if T != cache["n_frames"] or cache["kv"][-1][0].shape[0] != B * T:
            raise InputError(f"{B}x{T} queries for a cache of {cache['kv'][-1][0].shape[0]} frames")
        qx = self.query_input_proj(queries).reshape(B * T, 1, -1)
        bias = None
        if self.glimpse:  # a location prior on the logits: where to look is part of the query
            bias = (self.glimpse_log_map(queries) + math.log(self.n_patches)).reshape(B * T, 1, -1)
        if look is not None:
            prior = torch.where(look, 0.0, -8.0).to(qx.device, qx.dtype).reshape(B * T, 1, -1)
            bias = prior if bias is None else bias + prior
        out, maps = self.vit.read(qx, cache, temperature, bias)
        att = torch.stack(maps).mean(0)[:, 0]
        return out.view(B, T, -1), att.view(B, T, -1)

    def glimpse_log_map(self, queries):
        """queries (..., query_dim) -> the location map (..., N) as log-probabilities over the patches."""
        return queries[..., -self.n_patches:].float().log_softmax(-1)

    def rows(self, feats, fine=False):
        """Read features (B, T, C_vit) -> GPT input rows (B, T, E), frame index added."""
        T = feats.shape[1]
        if T > self.frame_pos.shape[0]:
            raise InputError(f"{T} frames but the model was built for at most {self.frame_pos.shape[0]}")
        proj = self.proj_fine if fine and self.proj_fine is not None else self.proj
        return proj(feats) + self.frame_pos[:T]

    # -- the GPT over one feature per frame, with optional text before (text-conditioned) or after (captioning)
    def sequence(self, feats, mode, captions=None, fine=False):
        """feats (B, T, C_vit) -> (hidden at the frame positions (B, T, E), caption loss or None)."""
        rows = self.rows(feats, fine)
        B, T, _ = rows.shape
        if mode == "video":
            return self.gpt.forward_embeds(rows), None
        if mode == "text":  # <|bos|> caption <|eos|> frames; left-padded so the frames line up at the end
            ids, mask = left_pad([[BOS] + encode_caption(c) + [EOS] + [IMG] * T for c in captions],
                                 pad_id=PAD, device=rows.device)
            return self.gpt.forward_embeds(self.gpt.embed(ids, rows), mask)[:, -T:], None
        if mode == "caption":  # frames <|bos|> caption <|eos|>, right-padded (causal: pads are never seen)
            seqs = [[IMG] * T + [BOS] + encode_caption(c) + [EOS] for c in captions]
            L = max(len(s) for s in seqs)
            ids = torch.full((B, L), PAD, dtype=torch.long)
            tgt = torch.full((B, L), -1, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                tgt[i, T:len(s) - 1] = torch.tensor(s[T + 1:])  # <|bos|> predicts the first caption token
            ids, tgt = ids.to(rows.device), tgt.to(rows.device)
            h = self.gpt.forward_embeds(self.gpt.embed(ids, rows))
            logits = self.gpt.logits(h[:, T:])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, T:].reshape(-1), ignore_index=-1,
                                   reduction="sum")
            return h[:, :T], global_mean(loss, (tgt[:, T:] != -1).sum(), rows.device)  # DDP-exact token mean
        raise InputError(f"unknown mode {mode!r}; expected one of {MODES}")

    def predict(self, h, feats, targets):
        """GPT hidden (B, T, E), the reads (B, T, C_vit) -> (the next frames' latents (B, T-1, D), their MSE
        against targets[:, 1:]). read_skip: the read of frame t, through read_head, is added, so "it will look as
        it looks now" is the default and the GPT learns the change (the same for both paths: a read that holds
        nothing adds nothing)."""
        pred = self.latent_head(h[:, :-1])
        pred = pred + self.read_head(feats[:, :-1]) if self.read_skip else pred
        return pred, F.mse_loss(pred.float(), targets[:, 1:].float())

    def latents(self, frames, encoder):
        """Prediction targets from the frozen encoder, standardised: (B, T, D); position t+1 is what position t
        predicts. frames are what get_batch() put in "latent_frames" (the target layer or the frames themselves);
        latent_target='delta' subtracts the first frame's latent (row 0 is then all zeros, never a target)."""
        B, T = frames.shape[:2]
        z = encoder(frames.flatten(0, 1).float()).view(B, T, -1)
        if self.latent_target == 'delta':
            z = z - z[:, :1]
        return (z - self.lat_mean) / self.lat_std

    def forward(self, frames, targets, mode="video", captions=None, n_passes=1, look=None, target_patches=None):
        """frames (B, T, 3, H, W); targets (B, T, D) standardised latents of the same frames; look: see read();
        target_patches (B, T, N) bool: where the target is, for the look loss (training only, look_weight).
        Position t predicts the latent of frame t+1. Returns a dict of losses and diagnostics."""
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError(f"mode must be one of {MODES} for the whole batch (per-sample modes broke "
                             f"training in the origin, BUG-003), got {mode!r}")
        B, T = frames.shape[:2]
        cache = self.encode(frames)
        text_mode = "text" if mode == "text" else "video"
        # pass 1 (coarse): the static query on every frame
        z_c, att_c = self.read(cache, self.q_static.expand(B, T, -1))
        h, _ = self.sequence(z_c, text_mode, captions)
        pred_c, loss_c = self.predict(h, z_c, targets)
        read_c = F.mse_loss(self.read_head(z_c).float(), targets.float())
        fine, cap_loss = [], None
        h = h.detach() if self.detach_coarse else h
        if self.recurrent:  # one fine pass whose queries come from its own state: pass 1 is the baseline only
            z_f, att_f, q = self.recurrent_reads(cache, text_mode, captions, look)
            h, cap_loss = self.sequence(z_f, mode if mode == "caption" else text_mode, captions, fine=True)
            pred_f, pass_loss = self.predict(h, z_f, targets)
            fine.append(pass_loss)
        else:
            for p in range(n_passes):  # pass 2+ (fine): frame t is read with the query predicted after frames < t
                q = torch.cat([self.q_init.expand(B, 1, -1), self.query_head(h[:, :-1])], 1)
                z_f, att_f = self.read(cache, q, look=look)
                last = p == n_passes - 1
                h, cap = self.sequence(z_f, "caption" if (last and mode == "caption") else text_mode, captions,
                                       fine=True)
                cap_loss = cap if cap is not None else cap_loss
                pred_f, pass_loss = self.predict(h, z_f, targets)
                fine.append(pass_loss)
        read_f = F.mse_loss(self.read_head(z_f).float(), targets.float())  # the last fine pass's reads
        loss_f = torch.stack(fine).mean()
        loss = loss_f + loss_c + (cap_loss if cap_loss is not None else 0.0)
        if self.read_weight > 0:
            loss = loss + self.read_weight * (read_c + read_f)
        look_loss = None
        if target_patches is not None and self.look_weight > 0:  # both paths alike (the last fine pass's reads)
            look_loss = fov_look_loss(att_f, target_patches) + fov_look_loss(att_c, target_patches)
            loss = loss + self.look_weight * look_loss
        return dict(loss=loss, loss_fine=fine[-1], loss_coarse=loss_c, loss_caption=cap_loss, loss_look=look_loss,
                    pred_fine=pred_f, loss_read_fine=read_f, loss_read_coarse=read_c, pred_coarse=pred_c,
                    z_fine=z_f, z_coarse=z_c, att_fine=att_f, att_coarse=att_c, queries=q)

    def recurrent_reads(self, cache, mode, captions=None, look=None):
        """The fine reads frame by frame: frame t is read with the query the GPT predicts after the fine reads of
        frames < t (frame 0: q_init). A tracker's loop: each query is one step from a place the model has seen,
        where n_passes=1 queries come from the static reads' state and drift. Equal to n_passes = n_frames,
        at about the cost of one pass (the GPT re-runs the prefix; it is causal, so the rows it has are final).
        -> features (B, T, C), attention (B, T, N), queries (B, T, query_dim)."""
        B, T = cache["kv"][-1][0].shape[0] // cache["n_frames"], cache["n_frames"]
        q, feats, maps, queries = self.q_init.expand(B, -1), [], [], []
        for t in range(T):
            queries.append(q)
            layers = [None if kv is None else tuple(x.unflatten(0, (B, T))[:, t] for x in kv) for kv in cache["kv"]]
            frame = dict(kv=layers, n_frames=1)
            z, a = self.read(frame, q[:, None], look=None if look is None else look[:, t:t + 1])
            feats.append(z)
            maps.append(a)
            if t < T - 1:
                q = self.query_head(self.sequence(torch.cat(feats, 1), mode, captions, fine=True)[0][:, -1])
        return torch.cat(feats, 1), torch.cat(maps, 1), torch.stack(queries, 1)

    @torch.no_grad()
    def caption(self, frames, max_new_tokens, n_passes=1):
        """Generated captions (rollout) from the final fine features, through the KV-cached GPT.generate."""
        B, T = frames.shape[:2]
        cache = self.encode(frames)
        if self.recurrent:
            z = self.recurrent_reads(cache, "video")[0]
        else:
            z, _ = self.read(cache, self.q_static.expand(B, T, -1))
            for p in range(n_passes):
                h, _ = self.sequence(z, "video", fine=p > 0)
                z, _ = self.read(cache, torch.cat([self.q_init.expand(B, 1, -1), self.query_head(h[:, :-1])], 1))
        idx = torch.tensor([[IMG] * T + [BOS]] * B, device=frames.device)
        out = self.gpt.generate(idx, max_new_tokens, vision_embeds=self.rows(z, fine=True), eos_id=EOS,
                                suppress_ids=(BOS, PAD))
        return [tok.decode([i for i in row.tolist() if i != EOS]) for row in out]


def check_cache(cache, query_mode):
    """BUG-005/006: a cache built for one layout read in the other was a KeyError deep in a loop.
    Here it is one clear error, and every path (training, captioning, generation) goes through read()."""
    kv = cache.get("kv") if isinstance(cache, dict) else None
    if not kv or kv[-1] is None:
        raise InputError("frame cache has no last-layer K/V: build it with FoveatedVLM.encode()")
    if query_mode == "deep" and any(layer is None for layer in kv):
        raise InputError("deep query mode needs the K/V of every layer but this cache is the shallow layout")


def encode_caption(caption):
    ids = tok.encode(caption)
    if len(ids) > caption_tokens:
        raise InputError(f"caption of {len(ids)} tokens exceeds caption_tokens={caption_tokens}: {caption!r}")
    return ids


def build_model(meta=None):
    """From config, or from a checkpoint's meta (init_from=<dir> / hf:): the meta gives the weights' shape, while
    the read settings (query_mode, attn_temperature: no weights) and the training settings are the config's."""
    reads = dict(query_mode=query_mode, attn_temperature=attn_temperature)
    if meta and (meta["vit"]["image_size"], meta["vit"]["patch_size"]) != (image_size, patch_size):
        raise InputError(f"the checkpoint's ViT takes {meta['vit']['image_size']} px frames in "
                         f"{meta['vit']['patch_size']} px patches; the config says image_size={image_size}, "
                         f"patch_size={patch_size}")
    vit_cfg = dataclass_from_dict(ViTConfig, {**meta["vit"], **reads}) if meta else ViTConfig(
        image_size=image_size, patch_size=patch_size, in_chans=3 + (8 if coord_channels else 0), n_layer=vit_layers,
        n_head=vit_heads, n_embd=vit_width, **reads)
    gpt_cfg = dataclass_from_dict(GPTConfig, meta["gpt"]) if meta else GPTConfig(
        vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, n_embd=n_embd,
        sequence_len=n_frames + caption_tokens + 4, image_token_id=IMG)
    fov = meta["foveated"] if meta else dict(query_dim=query_dim, latent_dim=latent_enc.dim,
                                             coord_channels=coord_channels, max_frames=n_frames, glimpse=glimpse,
                                             fine_proj=fine_proj, read_skip=read_skip, recurrent=recurrent)
    model = FoveatedVLM(vit_cfg, gpt_cfg, **fov, detach_coarse=detach_coarse, read_weight=read_weight,
                        look_weight=look_weight, latent_target=latent_target)
    return model, dict(vit=asdict(vit_cfg), gpt=asdict(gpt_cfg), foveated=fov)


def get_batch(split, indices):
    """A batch of videos (frames on device) for these global indices."""
    if task == 'folder':
        b = fov_folder_batch(data_dir, clips[split], indices, n_frames, image_size)
    else:
        b = fov_synthetic_batch(seed, split, indices, task=task, n_frames=n_frames, size=image_size,
                                n_distractors=n_distractors, noise=noise, cue_frames=cue_frames, p_change=p_change,
                                center_start=center_start, specks=specks, jitter=jitter)
    b["frames"] = b["frames"].to(device)
    b["target_patches"] = fov_target_patches(b["target_xy"], b["target_size"], image_size, patch_size).to(device) \
        if (oracle_look or look_weight > 0) and task != 'folder' else None
    b["look"] = b["target_patches"] if oracle_look else None
    # what the latent target encodes: the target alone (synthetic) or the whole frame
    b["latent_frames"] = b.pop("target_layer").to(device) if latent_target == 'target_layer' else b["frames"]
    return b


def check_captions(named):
    """Every caption the run can draw fits caption_tokens: checked once here, where it failed when a batch first
    drew it (mid-run). named: (where, caption) pairs."""
    for where, caption in named:
        if not isinstance(caption, str):
            raise InputError(f"{where}: caption must be a string, got {caption!r}")
        n = len(tok.encode(caption))
        if n > caption_tokens:
            raise InputError(f"{where}: caption of {n} tokens exceeds caption_tokens={caption_tokens}: {caption!r}")


def load_vit_init(vit):
    """The pretrained ViT's 'vit.*' weights from vit_init into vit, or one line naming what does not fit (a wrong
    shape was a multi-line RuntimeError)."""
    from safetensors.torch import load_file
    path = os.path.join(resolve_checkpoint(vit_init), "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"vit_init: no model.safetensors in {vit_init}")
    state = {k[4:]: v for k, v in load_file(path).items() if k.startswith("vit.")}
    own = vit.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs this ViT {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise InputError(f"vit_init {path} does not fit this ViT (vit_layers/vit_heads/vit_width/image_size/"
                         f"patch_size/coord_channels): {len(wrong)} shape mismatches {'; '.join(wrong[:2])}, "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    vit.load_state_dict(state)


latent_enc = fov_latent_encoder(latent_encoder, latent_channels, latent_grid, seed=0)
clips = {}
if task == 'folder':
    all_clips = fov_list_clips(data_dir)
    for name, _ in all_clips:  # every clip has its frames before training starts (one cheap read each)
        fov_check_clip(data_dir, name, n_frames)
    check_captions([(f"clip {name!r}", c) for name, c in all_clips])
    clips = dict(train=fov_clip_split(all_clips, 'train'), val=fov_clip_split(all_clips, 'val'))
    if n_eval > len(clips['val']):  # eval indices would wrap around and count the same clips several times
        print(f"n_eval={n_eval} capped at the {len(clips['val'])} distinct held-out clips (every 10th of "
              f"{len(all_clips)})")
        n_eval = config['n_eval'] = len(clips['val'])
        n_vis = config['n_vis'] = min(n_vis, n_eval)
else:
    check_captions([(f"synthetic task {task!r}", c) for c in fov_synthetic_captions(task)])

# == the run (tests exec this file up to this line to get the definitions above) ==
ddp = init_distributed(device)
device, device_type, master = ddp['device'], ddp['device_type'], ddp['master']
torch.manual_seed(seed + ddp['rank'])
ctx, dtype_name = autocast_ctx(device_type, dtype)
out_dir = run_dir(out_dir, RECIPE, init_from)
resume = init_from == 'resume'
latent_enc.to(device)

if init_from != 'scratch':
    src = os.path.join(out_dir, 'ckpt') if resume else resolve_checkpoint(init_from)
    globals().update(adopt_checkpoint_config(load_meta(src), config, MODEL_KEYS, verbose=master))
if init_from in ('scratch', 'resume'):
    model, model_meta = build_model()
else:  # a checkpoint dir or hf:owner/name: the architecture comes from its meta
    model, model_meta = build_model(load_meta(src))
    load_checkpoint(src, model)
model.to(device)
if vit_init and init_from == 'scratch':
    load_vit_init(model.vit)
if freeze_vit:
    model.vit.requires_grad_(False)
if init_from == 'scratch':  # standardise latents with statistics of 64 training videos (a function of seed)
    with torch.no_grad():
        z = model.latents(get_batch('train', range(10**6, 10**6 + 64))["latent_frames"], latent_enc)[:, 1:].flatten(0, 1)
        model.lat_mean.copy_(z.mean(0))
        model.lat_std.copy_(z.std(0).clamp_min(1e-3))
optimizer = configure_optimizers(model, lr, weight_decay, device_type=device_type)
start_step, train_seconds, budget_seconds = 0, 0.0, 0.0
if resume:
    meta = load_checkpoint(os.path.join(out_dir, 'ckpt'), model, optimizer)
    set_rng_state(meta['rng'])
    start_step = meta['step']
    # a run stopped on its time budget continues its clocks (the LR schedule, the budget, the reported seconds);
    # they restarted at 0, so the LR jumped back up. Checkpoints from before the keys: 0
    train_seconds = meta.get('train_seconds', 0.0)
    budget_seconds = meta.get('budget_seconds', train_seconds)
raw_model = model
model = maybe_compile(model, compile, device_type)
if ddp['ddp']:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # video-only batches leave the LM head unused, so DDP must tolerate unused parameters
    model = DDP(model, device_ids=[ddp['local_rank']] if device_type == 'cuda' else None,
                find_unused_parameters=True)
n_params = sum(p.numel() for p in raw_model.parameters())
wandb = WandbLogger(wandb_log and master, wandb_project, wandb_run_name, config, out_dir)
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"foveated: {n_params / 1e6:.2f}M params | task {task} | {query_mode} queries, temperature "
          f"{attn_temperature}, {n_passes} fine pass(es) | q_static std {raw_model.q_static.std().item():.2f} | "
          f"out {out_dir}")

# -----------------------------------------------------------------------------
# eval: held-out videos 0..n_eval-1, video-only mode, fine queries rolled out from the model's own predictions


@torch.no_grad()
def evaluate(step):
    raw_model.eval()
    acc = {k: [] for k in ("pf", "pc", "tg", "all", "zf", "zc", "af", "ac", "qf", "xy")}
    size = 0
    for start in range(0, n_eval, eval_batch):
        b = get_batch('val', range(start, min(n_eval, start + eval_batch)))
        with ctx:
            tgt = raw_model.latents(b["latent_frames"], latent_enc)
            r = raw_model(b["frames"], tgt, "video", n_passes=n_passes, look=b["look"])
        for k, v in (("pf", r["pred_fine"]), ("pc", r["pred_coarse"]), ("tg", tgt[:, 1:]), ("all", tgt),
                     ("zf", r["z_fine"]), ("zc", r["z_coarse"]), ("af", r["att_fine"]), ("ac", r["att_coarse"]),
                     ("qf", r["queries"])):
            acc[k].append(v.float().cpu())
        if b["target_xy"] is not None:
            acc["xy"].append(b["target_xy"])
            size = b["target_size"]
    a = {k: torch.cat(v) for k, v in acc.items() if v}
    lf, lc = F.mse_loss(a["pf"], a["tg"]).item(), F.mse_loss(a["pc"], a["tg"]).item()
    ent_f, max_f = fov_attention_stats(a["af"])
    ent_c, max_c = fov_attention_stats(a["ac"])
    # loss_mean: predicting the training mean (0 after standardisation); a path above it has not learned at all
    # loss_copy: predicting frame t+1 as frame t's true latent ("as it looks now", known exactly): a reference
    m = dict(ratio=lc / max(lf, 1e-12), loss_fine=lf, loss_coarse=lc, loss_mean=(a["tg"] ** 2).mean().item(),
             loss_copy=F.mse_loss(a["all"][:, :-1], a["tg"]).item(),
             entropy_fine=ent_f, entropy_coarse=ent_c,
             entropy_gap=ent_c - ent_f, max_att_fine=max_f, max_att_coarse=max_c,
             cos_z_fine_coarse=fov_cosine(a["zf"], a["zc"]))
    per_frame = dict(fine=fov_per_frame_mse(a["pf"], a["tg"]), coarse=fov_per_frame_mse(a["pc"], a["tg"]),
                     copy=fov_per_frame_mse(a["all"][:, :-1], a["tg"]))
    if read_weight > 0:  # how much of its own frame's latent each path's reads hold (the read head's MSE), also per
        # frame: where the track is lost
        w, bias = (p.detach().float().cpu() for p in (raw_model.read_head.weight, raw_model.read_head.bias))
        for path, z in (("fine", a["zf"]), ("coarse", a["zc"])):
            read = F.linear(z, w, bias)
            m[f"loss_read_{path}"] = F.mse_loss(read, a["all"]).item()
            per_frame[f"read_{path}"] = fov_per_frame_mse(read, a["all"])
    if "xy" in a:  # attention mass on the target's patches (frames 1.. : frame 0 has no history)
        m["target_att_fine"] = fov_target_hit(a["af"][:, 1:], a["xy"][:, 1:], size, image_size, patch_size)
        m["target_att_coarse"] = fov_target_hit(a["ac"][:, 1:], a["xy"][:, 1:], size, image_size, patch_size)
        if raw_model.glimpse:  # the location maps' mass on the target's patches (uniform: ~0.05)
            maps = dict(fine=raw_model.glimpse_log_map(a["qf"][:, 1:]).exp(),
                        coarse=raw_model.glimpse_log_map(raw_model.q_static.detach().float().cpu()).exp()
                        .expand_as(a["af"][:, 1:]))
            for name, g in maps.items():
                m[f"glimpse_target_{name}"] = fov_target_hit(g, a["xy"][:, 1:], size, image_size, patch_size)
    if n_caption_eval > 0:
        b = get_batch('val', range(min(n_caption_eval, n_eval)))
        with ctx:
            gen = raw_model.caption(b["frames"], caption_tokens + 1, n_passes)
        m["caption_exact"] = float(np.mean([g == c for g, c in zip(gen, b["captions"])]))
        m["caption_word_acc"] = float(np.mean([np.mean([x == y for x, y in zip(g.split(), c.split())] +
                                                       [False] * abs(len(g.split()) - len(c.split())))
                                               for g, c in zip(gen, b["captions"])]))
        print(f"  caption: {gen[0]!r} (truth {b['captions'][0]!r})")
    # the picture: frames, coarse attention, fine attention, for the first n_vis held-out videos
    png = None  # n_vis=0: no picture
    if n_vis > 0:
        b = get_batch('val', range(n_vis))
        strips = [fov_attention_strip(b["frames"][i].cpu(), a["ac"][i], a["af"][i]) for i in range(n_vis)]
        png = save_png(torch.cat(strips, 1), os.path.join(out_dir, f"attention_{step:06d}.png"))
    raw_model.train()
    return m, per_frame, png


def save_all(step, metrics, train_seconds):
    # train_seconds: the loop's seconds without evals (reported); budget_seconds: the budget's clock, evals
    # included (what budget_lr_step and budget_spent see); a resumed run continues both
    save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer,
                    meta=dict(recipe=RECIPE, step=step, config=config, rng=rng_state(), metrics=metrics,
                              train_seconds=train_seconds, budget_seconds=time.perf_counter() - t_start, **model_meta))


def run_eval(step, train_seconds):
    m, per_frame, png = evaluate(step)
    print(f"eval step {step}: " + format_metrics(m, TARGETS))
    warnings = fov_hollow_warnings(m, (image_size // patch_size) ** 2)
    for w in warnings:  # a diagnostic only: what 'met' means is unchanged
        print(f"  warning: {w}")
    print("  per-frame loss fine   " + " ".join(f"{x:.3f}" for x in per_frame["fine"]))
    print("  per-frame loss coarse " + " ".join(f"{x:.3f}" for x in per_frame["coarse"]))
    print("  per-frame loss copy   " + " ".join(f"{x:.3f}" for x in per_frame["copy"]))
    for path in ("fine", "coarse"):
        if f"read_{path}" in per_frame:  # frames 0..T-1 (the loss lines above are the predictions of 1..T-1)
            print(f"  per-frame read {path:6s} " + " ".join(f"{x:.3f}" for x in per_frame[f"read_{path}"]))
    write_results(out_dir, RECIPE, 'val', n_eval, m, TARGETS, step=step, train_seconds=train_seconds,
                  device=device, dtype=dtype_name, params=n_params, config=config, per_frame=per_frame,
                  task=task, png=os.path.basename(png) if png else None, warnings=warnings)
    wandb.log(m, step, images={"attention": png})
    save_all(step, m, train_seconds)
    return m


t_start = time.perf_counter() - budget_seconds  # the budget's clock (reset below, after the matmul measurement)
if eval_only:
    if master:
        run_eval(start_step, train_seconds)
    wandb.finish()
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training

peak = measure_matmul_peak(device) if master else None
n_patches = (image_size // patch_size) ** 2
tokens_per_step = batch_size * n_frames * n_patches * ddp['world_size']  # patch tokens encoded per step
# ~6 * params * tokens for the ViT encode, plus the GPT over one row per frame for the coarse and each fine pass
flops_per_step = 6 * (sum(p.numel() for p in raw_model.vit.parameters()) * tokens_per_step +
                      sum(p.numel() for p in raw_model.gpt.parameters()) * batch_size * n_frames * (1 + n_passes))
t0, last_log = time.perf_counter(), start_step
counts = {k: 0 for k in MODES}
t_start = time.perf_counter() - budget_seconds
for step in range(start_step, max_steps):
    lr_now = get_lr(budget_lr_step(step, max_steps, time.perf_counter() - t_start, max_train_seconds, device),
                    max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    mode = fov_pick_mode(seed, step, mode_weights, MODES)  # one mode for the whole batch (BUG-003)
    counts[mode] += 1
    b = get_batch('train', batch_indices(step, batch_size, ddp['rank'], ddp['world_size']))
    with ctx:
        tgt = raw_model.latents(b["latent_frames"], latent_enc)
        r = model(b["frames"], tgt, mode, b["captions"], n_passes, b["look"], b["target_patches"])
    loss = r["loss"]
    check_finite(loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    out_of_time = budget_spent(time.perf_counter() - t_start, max_train_seconds, device)
    last = step == max_steps - 1 or out_of_time
    if step % log_interval == 0 or last:
        loss_avg = mean_across_ranks(loss.item(), device)  # the global batch's loss (every rank joins)
    if master and (step % log_interval == 0 or last):
        elapsed = time.perf_counter() - t0
        train_seconds, t0 = train_seconds + elapsed, time.perf_counter()
        dt = elapsed / max(1, step + 1 - last_log)
        last_log = step + 1
        extra = f"{mode:7s} | fine {r['loss_fine'].item():.4f} | coarse {r['loss_coarse'].item():.4f}"
        if r["loss_caption"] is not None:
            extra += f" | caption {r['loss_caption'].item():.3f}"
        if r["loss_look"] is not None:
            extra += f" | look {r['loss_look'].item():.3f}"
        print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens_per_step, flops_per_step, peak, extra))
        wandb.log(dict(loss=loss.item(), loss_fine=r['loss_fine'].item(), loss_coarse=r['loss_coarse'].item(),
                       lr=lr_now), step)
    if master and ((step + 1) % eval_interval == 0 or last):
        train_seconds += time.perf_counter() - t0
        run_eval(step + 1, train_seconds)
        t0, last_log = time.perf_counter(), step + 1
    if out_of_time:
        if master:
            print(f"stopping at step {step + 1}/{max_steps}: max_train_seconds={max_train_seconds:.0f} reached")
        break
if master:
    print(f"done: {sum(counts.values())} steps | {train_seconds:.0f} s of training in total (with a resume's earlier "
          f"runs) | batches per mode {counts}")
if master and push_to_hub:
    push_run_to_hub(push_to_hub, out_dir, RECIPE, config)
wandb.finish()
model = unwrap(model)  # drop the DDP wrapper first: it holds the process group, which must not outlive teardown
cleanup_distributed()
