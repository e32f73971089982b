"""
Foveated video VLM: does looking where an LLM predicts beat looking with one learned static query?

    python train_foveated.py                                   # synthetic 'track' task, 2-core CPU, ~10 min
    python train_foveated.py --task=static_large               # control: a large static target (ratio ~1)
    python train_foveated.py --query_mode=shallow --attn_temperature=1.0 --n_passes=2   # ablations
    python train_foveated.py config/foveated_video.py          # GPU scale: real clips + TAESD latents
    python train_foveated.py --oracle_look=True                # diagnostic: the fine reads are shown the target
    python train_foveated.py --init_from=resume --out_dir=out/<run>   # continue a run
    python train_foveated.py --init_from=out/<run>/ckpt --eval_only=True

Every frame is encoded ONCE by a shared ViT whose per-layer patch K/V are cached; query tokens then read
the cache (deep: at every layer; shallow: after the last), one query feature per frame.
  pass 1 (coarse): the learned q_static reads every frame -> GPT -> a predicted query per frame
  pass 2 (fine):   shifted queries [q_init, q_1, ..., q_{T-1}] read the frames -> GPT -> the next frame's latent
  (n_passes > 1 repeats pass 2, each time with queries predicted from the previous fine pass; recurrent=True
  reads frame by frame, each query from the fine reads before it)
loss = fine + coarse (+ caption cross-entropy in captioning mode; + read_weight x the reads' own-frame loss;
+ look_weight x both paths' -log attention mass on the target, synthetic training only: where to look is taught,
never given at eval);
detach_coarse=True stops the fine loss at the predicted queries: it never reaches the baseline's own weights
(q_static, proj) or flows back through the coarse pass, though the weights both paths share (ViT, GPT, heads,
frame_pos) learn from both losses; the mode (video-only / text-conditioned / captioning) is drawn per batch.
The hypothesis is ratio = loss_coarse / loss_fine > 1 on held-out videos. Each path predicts frame t+1 as
read_head(its read of frame t) + the GPT's change (read_skip), so a read that holds the target helps at once.
The synthetic latent target is the next frame's target layer (the tracked sprite alone) on a spatial grid, among
moving look-alike distractors: see data_foveated.py for why a global whole-frame target cannot show a gain.
Experiments and ablations: notes/foveated.md.
"""
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import install_error_hook
install_error_hook()
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, left_pad, set_checkpointing  # noqa: E402
from runtime import (Clock, Logger, check_finite, configure_optimizers, get_lr, global_mean, log_line,  # noqa: E402
                     mean_across_ranks, set_lr, setup, sync_grads, teardown, wrap,
                     MemoryPlan, kv_cache_bytes, plan_probe)
from checkpoint import (adopt_checkpoint_config, load_checkpoint, rng_state, save_checkpoint,  # noqa: E402
                        set_rng_state, unwrap)
from data import Tokenizer, batch_indices  # noqa: E402
from data_foveated import (fov_caption_scores, fov_check_cache, fov_check_captions, fov_check_clip,  # noqa: E402
                           fov_check_config, fov_clip_split, fov_coord_planes, fov_folder_batch,
                           fov_advantage, fov_hollow_warnings, fov_latent_encoder, fov_list_clips, fov_load_vit_init,
                           fov_look_loss, fov_metrics, fov_pick_mode, fov_save_attention, fov_synthetic_batch,
                           fov_synthetic_captions, fov_target_patches, fov_vit_input)

# -----------------------------------------------------------------------------
# config (config/foveated_video.py: the GPU run on real clips)
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
torch_threads = 0          # 0 = auto (runtime.pick_threads: OMP_NUM_THREADS, else the cores per process)
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
jitter = 0.5               # std (px/frame, per axis) of each sprite's random velocity kick per frame; 0 (pure
                           # momentum) lets dead reckoning from the cue predict nearly as well as looking
latent_encoder = 'fixed'   # 'fixed' (seeded random high-pass filters) | path/to/taesd_encoder.safetensors
latent_target = 'target_layer'  # what position t predicts, through the frozen encoder:
                           # 'target_layer': frame t+1 with only the target drawn (on black), at a spatial grid:
                           #   where the tracked object will be and what it will look like (synthetic only)
                           # 'delta': z(t+1) - z(frame 0) of the whole frame | 'frame': z(t+1) of the whole frame
latent_channels = 8
latent_grid = 2            # latent pooled to grid x grid cells (1: position-invariant)
# encoder: shared ViT, per-layer patch K/V cached, queries read it
patch_size = 4             # 8x8 patches of 4 px: a read can isolate the 4 px target
vit_layers = 3
vit_heads = 4
vit_width = 64
coord_channels = True      # append fixed sin/cos x,y channels so keys carry position from step 0
query_mode = 'deep'        # 'deep' (read at every layer) | 'shallow' (read the last layer only)
attn_temperature = 0.1     # divides the query->patch logits (< 1 sharper)
query_dim = 32
glimpse = False            # True: the last (image_size // patch_size)^2 numbers of a query are a location map, logits
                           # over the patch grid whose log-softmax (+ log N: a flat map adds nothing) is added to the
                           # read's query->patch logits at every layer (needs query_dim > N)
freeze_vit = False         # needs vit_init (a frozen random ViT is refused)
vit_init = ''              # checkpoint dir whose model.safetensors holds 'vit.*' weights, or a transformers encoder
                           #   (dir or hf:, e.g. hf:facebook/dinov2-small): its shapes, weights and normalisation
# LLM
n_layer = 2
n_head = 4
n_embd = 128
init_gpt = ''              # a pretrained LLM (dir or hf:owner/name: Llama family, nanochat, this repo's GPT): its
                           #   weights, shape and tokenizer, the recipe's special tokens appended ('' = from scratch)
# the next three let a path use what it reads (both paths alike)
fine_proj = True           # True: the fine reads enter the GPT through their own Projector (the coarse ones: proj)
read_weight = 1.0          # > 0: both paths' reads of frame t must also give frame t's own latent through one shared
                           # linear head (a short gradient path to "what is here")
read_skip = True           # True: the prediction of frame t+1 adds read_head(read of frame t) to the GPT's latent_head:
                           # the GPT learns the change from what the read sees now
look_weight = 1.0          # synthetic only, training only: + look_weight x -log(attention mass on the target's patches)
                           # for the reads of BOTH paths (one static query simply cannot follow a mover); the
                           # prediction loss alone did not teach the predicted queries where to look. Eval never
                           # sees a position. 0: no supervision of where to look
read_top_k = 0             # > 0: every read (both paths) is a hard glimpse of its k best patches per layer, straight-
                           # through (value: softmax over the k; gradient: over all patches): where a read looks
                           # decides what it gets, so the prediction loss has a reason to teach it (0: soft, all)
read_gumbel = False        # read_top_k > 0, training only: the k patches are drawn (Gumbel top-k), not the k best
reinforce_weight = 0.0     # > 0 (read_top_k, read_gumbel): + a policy gradient on every read's drawn patches (REINFORCE),
                           # rewarded per video and frame by the prediction made from that read: the fine read by its
                           # gain over the static read's (coarse loss - fine loss), the static read by -its loss; each
                           # against the batch mean, in units of the batch's spread
reinforce_static = True    # False: the policy term on the fine reads only (the static read's draws get none)
contrast_weight = 0.0      # > 0: + contrast_weight x cos(fine read, coarse read) per frame (after frame 0): a push for
                           # the fine reads to hold something the static read does not
n_passes = 1               # fine passes (each re-predicts the queries from the previous fine pass)
oracle_look = False        # DIAGNOSTIC (synthetic only), never a result: the fine reads get the target's true
                           # patches as a location prior (-8 on every other patch): what perfect looking buys
recurrent = False          # True: frame t's fine query comes from the GPT state after the FINE reads of frames < t
                           # (a tracker's loop, frame by frame; equals n_passes = n_frames at ~one pass's cost)
detach_coarse = True       # the fine loss stops at the predicted queries and never flows back through the coarse
                           # pass (its reads, the GPT on them) to the baseline's own weights (q_static, proj); the
                           # shared ViT, GPT, heads and frame_pos still learn from both losses, so the baseline is a
                           # static query on weights both paths shape. False: joint training
mode_weights = (0.6, 0.2, 0.2)   # video-only, text-conditioned, captioning; drawn per batch
caption_tokens = 40        # caption budget (longer captions are an error)
n_caption_eval = 64        # held-out videos captioned (generated) at each eval
# training
max_steps = 3450           # what 600 s of training reaches on a quiet 2-core CPU
max_train_seconds = 0.0    # opt-in wall-clock cap (> 0: the loop stops there and the LR decays on steps or
                           # time, whichever is further along); 0: step-exact, reproducible
batch_size = 16            # per micro-batch and process
grad_accum_steps = 1       # micro-batches per step: a step trains on batch_size * grad_accum_steps * processes videos
activation_checkpointing = False  # recompute each ViT / GPT block in the backward (less memory, more compute)
plan = False                 # print the memory plan (two traced steps: runtime.MemoryPlan), then stop
plan_gpu_gib = 0.0           # the GPU size the plan fits the batch to (0: the visible GPU, else 80 GiB)
lr = 2e-3
min_lr_frac = 0.1
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 50
eval_interval = 1000       # and at the end
n_eval = 256
eval_batch = 64
n_vis = 3                  # videos drawn in the attention strip PNG (0: no PNG)
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'foveated'
push_to_hub = ''           # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
config = configure(globals())

RECIPE = 'foveated'
TARGETS = {"ratio": (">=", 1.15), "entropy_gap": (">", 0.0)}  # entropy_gap = coarse - fine attention entropy
# the model's weights' shape: a run from a checkpoint takes these from it, and says so (the data's shape, e.g.
# image_size or n_frames, and the read settings, query_mode / attn_temperature, stay the config's: build_model)
MODEL_KEYS = ("vit_layers", "vit_heads", "vit_width", "coord_channels", "query_dim", "glimpse", "n_layer", "n_head",
              "n_embd", "fine_proj", "read_skip", "recurrent")
MODES = ("video", "text", "caption")
tok = Tokenizer()
BOS, EOS, PAD, IMG = tok['<|bos|>'], tok['<|eos|>'], tok['<|pad|>'], tok['<|image|>']
fov_check_config(config)
# a transformers encoder as vit_init decides the ViT's shape (the config's vit_* must agree) and gives its weights
vit_src = None
if vit_init:  # (pretrained_vision only then: a fork of this recipe runs without it)
    from pretrained_vision import is_foreign, load_vision, recipe_vit_config
    vit_src = load_vision(vit_init) if is_foreign(vit_init) else None
if vit_src and coord_channels:
    raise InputError(f"vit_init={vit_init} is a pretrained RGB encoder: set coord_channels=False")

# -----------------------------------------------------------------------------
# the model: shared ViT + static/predicted queries + GPT over one feature per frame


class FoveatedVLM(nn.Module):
    def __init__(self, vit_cfg, gpt_cfg, query_dim, latent_dim, coord_channels=True, max_frames=16, glimpse=False,
                 fine_proj=False, read_skip=False, recurrent=False, detach_coarse=True, read_weight=0.0,
                 look_weight=0.0, latent_target='frame', read_top_k=0, read_gumbel=False, contrast_weight=0.0,
                 reinforce_weight=0.0, reinforce_static=True):
        super().__init__()
        self.glimpse = glimpse
        # training settings, not the weights' shape (so never in the checkpoint's "foveated" meta): see the config
        self.detach_coarse, self.read_weight, self.look_weight = detach_coarse, read_weight, look_weight
        self.read_top_k, self.read_gumbel, self.contrast_weight = read_top_k, read_gumbel, contrast_weight
        self.reinforce_weight, self.reinforce_static = reinforce_weight, reinforce_static
        self.latent_target = latent_target
        self.n_patches = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
        if glimpse and query_dim <= self.n_patches:
            raise InputError(f"glimpse=True uses the last {self.n_patches} numbers of a query as its location map "
                             f"(one per patch), so query_dim must exceed {self.n_patches}; got {query_dim}")
        self.vit = ViT(vit_cfg)
        self.gpt = GPT(gpt_cfg)
        # queries at std 1.0: at 0.02 every query read the same uniform average
        self.q_static = nn.Parameter(torch.randn(1, query_dim))
        self.q_init = nn.Parameter(torch.randn(1, query_dim))  # the fine query of frame 0 (no history yet)
        # no bias, so the projected query is the query's own signal, never a shared offset
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
            self.register_buffer("coords", fov_coord_planes(vit_cfg.image_size), persistent=False)
        # latent standardisation (computed once from training videos; saved with the weights)
        self.register_buffer("lat_mean", torch.zeros(latent_dim))
        self.register_buffer("lat_std", torch.ones(latent_dim))

    # -- encode once, read many times
    def encode(self, frames):
        """frames (B, T, 3, H, W) in [0, 1] -> the per-layer K/V cache of all B*T frames. Shallow mode keeps
        only the last layer's K/V (the other slots are None): the two layouts every path must accept."""
        c = self.vit.config
        kv = self.vit.encode(fov_vit_input(frames, self.coords if self.coord_channels else None, c.image_mean,
                                           c.image_std))["kv"]
        if self.vit.config.query_mode == "shallow":
            kv = [None] * (len(kv) - 1) + [kv[-1]]
        return dict(kv=kv, n_frames=frames.shape[1])

    def read(self, cache, queries, temperature=None, look=None, logps=None):
        """queries (B, T, query_dim), one per frame -> features (B, T, C), attention (B, T, N) averaged
        over the layers read (deep: all, shallow: the last). look (B, T, N) bool: the oracle_look diagnostic's
        location prior (0 on those patches, -8 on the others). logps: a list that gets the drawn glimpses'
        log-probability (B, T), summed over the layers (read_top_k with read_gumbel in training)."""
        fov_check_cache(cache, self.vit.config.query_mode)
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
        layer_logps = [] if logps is not None else None
        out, maps = self.vit.read(qx, cache, temperature, bias, self.read_top_k, self.read_gumbel and self.training,
                                  layer_logps)
        if logps is not None:
            logps.append(torch.stack(layer_logps).sum(0).view(B, T))
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
    def sequence(self, feats, mode, captions=None, fine=False, caption_count=None):
        """feats (B, T, C_vit) -> (hidden at the frame positions (B, T, E), caption loss or None). caption_count:
        the caption tokens the loss is a mean over (default: this batch's; see forward)."""
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
            count = (tgt[:, T:] != -1).sum() if caption_count is None else caption_count
            return h[:, :T], global_mean(loss, count, rows.device)  # DDP-exact token mean
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

    def forward(self, frames, targets, mode="video", captions=None, n_passes=1, look=None, target_patches=None,
                caption_count=None):
        """frames (B, T, 3, H, W); targets (B, T, D) standardised latents of the same frames; look: see read();
        target_patches (B, T, N) bool: where the target is, for the look loss (training only, look_weight).
        caption_count: the caption loss's token count (default: this batch's); gradient accumulation passes the
        step's count per micro-batch, so that each micro-batch's loss / grad_accum_steps sums to the step's.
        Position t predicts the latent of frame t+1. Returns a dict of losses and diagnostics."""
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError(f"mode must be one of {MODES} for the whole batch (a batch of mixed modes broke "
                             f"training), got {mode!r}")
        B, T = frames.shape[:2]
        cache = self.encode(frames)
        text_mode = "text" if mode == "text" else "video"
        # pass 1 (coarse): the static query on every frame
        policy = self.reinforce_weight > 0 and self.training
        logps_c, logps_f = ([], []) if policy else (None, None)
        z_c, att_c = self.read(cache, self.q_static.expand(B, T, -1), logps=logps_c)
        h, _ = self.sequence(z_c, text_mode, captions)
        pred_c, loss_c = self.predict(h, z_c, targets)
        read_c = F.mse_loss(self.read_head(z_c).float(), targets.float())
        fine, cap_loss = [], None
        h = h.detach() if self.detach_coarse else h
        if self.recurrent:  # one fine pass whose queries come from its own state: pass 1 is the baseline only
            z_f, att_f, q = self.recurrent_reads(cache, text_mode, captions, look, logps_f)
            h, cap_loss = self.sequence(z_f, mode if mode == "caption" else text_mode, captions, fine=True,
                                        caption_count=caption_count)
            pred_f, pass_loss = self.predict(h, z_f, targets)
            fine.append(pass_loss)
        else:
            for p in range(n_passes):  # pass 2+ (fine): frame t is read with the query predicted after frames < t
                q = torch.cat([self.q_init.expand(B, 1, -1), self.query_head(h[:, :-1])], 1)
                last = p == n_passes - 1
                z_f, att_f = self.read(cache, q, look=look, logps=logps_f if last else None)
                h, cap = self.sequence(z_f, "caption" if (last and mode == "caption") else text_mode, captions,
                                       fine=True, caption_count=caption_count)
                cap_loss = cap if cap is not None else cap_loss
                pred_f, pass_loss = self.predict(h, z_f, targets)
                fine.append(pass_loss)
        read_f = F.mse_loss(self.read_head(z_f).float(), targets.float())  # the last fine pass's reads
        loss_f = torch.stack(fine).mean()
        loss = loss_f + loss_c + (cap_loss if cap_loss is not None else 0.0)
        if self.read_weight > 0:
            loss = loss + self.read_weight * (read_c + read_f)
        if policy:
            loss = loss + self.reinforce_weight * self.policy_loss(pred_f, pred_c, targets, torch.cat(logps_f, 1),
                                                                   logps_c[0] if self.reinforce_static else None)
        if self.contrast_weight > 0:  # frame 0's fine read has no history to differ by
            loss = loss + self.contrast_weight * F.cosine_similarity(z_f[:, 1:], z_c[:, 1:], dim=-1).mean()
        look_loss = None
        if target_patches is not None and self.look_weight > 0:  # both paths alike (the last fine pass's reads)
            look_loss = fov_look_loss(att_f, target_patches) + fov_look_loss(att_c, target_patches)
            loss = loss + self.look_weight * look_loss
        return dict(loss=loss, loss_fine=fine[-1], loss_coarse=loss_c, loss_caption=cap_loss, loss_look=look_loss,
                    pred_fine=pred_f, loss_read_fine=read_f, loss_read_coarse=read_c, pred_coarse=pred_c,
                    z_fine=z_f, z_coarse=z_c, att_fine=att_f, att_coarse=att_c, queries=q)

    @staticmethod
    def policy_loss(pred_f, pred_c, targets, logp_f, logp_c):
        """REINFORCE on the drawn glimpses: the fine read of frame t is rewarded by its prediction's gain over the
        static read's on the same video and frame, the static read by minus its own error; each reward against
        the batch mean for that frame, in units of the batch's spread. logp_f, logp_c (B, T): the reads'
        log-probabilities (the last frame's read predicts nothing and gets no reward); logp_c None: fine only."""
        err_f = (pred_f.float() - targets[:, 1:].float()).pow(2).mean(-1).detach()  # (B, T-1)
        err_c = (pred_c.float() - targets[:, 1:].float()).pow(2).mean(-1).detach()
        loss = -(fov_advantage(err_c - err_f) * logp_f[:, :-1]).mean()
        return loss if logp_c is None else loss - (fov_advantage(-err_c) * logp_c[:, :-1]).mean()

    def recurrent_reads(self, cache, mode, captions=None, look=None, logps=None):
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
            z, a = self.read(frame, q[:, None], look=None if look is None else look[:, t:t + 1], logps=logps)
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


def encode_caption(caption):
    ids = tok.encode(caption)
    if len(ids) > caption_tokens:
        raise InputError(f"caption of {len(ids)} tokens exceeds caption_tokens={caption_tokens}: {caption!r}")
    return ids


def caption_targets(captions):
    """The caption loss's token count for these captions: each one's tokens and its <|eos|> (see sequence())."""
    return sum(len(encode_caption(c)) + 1 for c in captions)


def build_model(meta=None, llm=None):
    """From config, or from a checkpoint's meta (init_from=<dir> / hf:): the meta gives the weights' shape, while
    the read settings (query_mode, attn_temperature: no weights) and the training settings are the config's.
    llm: a GPT that takes the place of the config's (a loaded LLM; its shape sizes the projectors and heads)."""
    reads = dict(query_mode=query_mode, attn_temperature=attn_temperature)
    if meta and (meta["vit"]["image_size"], meta["vit"]["patch_size"]) != (image_size, patch_size):
        raise InputError(f"the checkpoint's ViT takes {meta['vit']['image_size']} px frames in "
                         f"{meta['vit']['patch_size']} px patches; the config says image_size={image_size}, "
                         f"patch_size={patch_size}")
    if not meta and vit_src:
        vit_cfg = recipe_vit_config(vit_src[1], vit_init, image_size, patch_size, vit_width, vit_layers, vit_heads, **reads)
    else:
        vit_cfg = ViTConfig(**{**meta["vit"], **reads}) if meta else ViTConfig(
            image_size=image_size, patch_size=patch_size, in_chans=3 + (8 if coord_channels else 0), n_layer=vit_layers,
            n_head=vit_heads, n_embd=vit_width, **reads)
    gpt_cfg = llm.config if llm is not None else GPTConfig(**meta["gpt"]) if meta else GPTConfig(
        vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, n_embd=n_embd,
        sequence_len=n_frames + caption_tokens + 4, image_token_id=IMG)
    fov = meta["foveated"] if meta else dict(query_dim=query_dim, latent_dim=latent_enc.dim,
                                             coord_channels=coord_channels, max_frames=n_frames, glimpse=glimpse,
                                             fine_proj=fine_proj, read_skip=read_skip, recurrent=recurrent)
    model = FoveatedVLM(vit_cfg, gpt_cfg, **fov, detach_coarse=detach_coarse, read_weight=read_weight,
                        look_weight=look_weight, latent_target=latent_target, read_top_k=read_top_k,
                        read_gumbel=read_gumbel, contrast_weight=contrast_weight, reinforce_weight=reinforce_weight,
                        reinforce_static=reinforce_static)
    if llm is not None:
        model.gpt = llm
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


# the data's input checks, at startup: every clip has its frames and every caption fits (both failed mid-run,
# when a batch first drew them); the frozen latent encoder is built before the run seeds the model's init
latent_enc = fov_latent_encoder(latent_encoder, latent_channels, latent_grid, seed=0)
clips = {}
if task == 'folder':
    all_clips = fov_list_clips(data_dir)
    for name, _ in all_clips:  # one cheap read each
        fov_check_clip(data_dir, name, n_frames)
    named_captions = [(f"clip {name!r}", c) for name, c in all_clips]
    clips = dict(train=fov_clip_split(all_clips, 'train'), val=fov_clip_split(all_clips, 'val'))
    if n_eval > len(clips['val']):  # eval indices would wrap around and count the same clips several times
        print(f"n_eval={n_eval} capped at the {len(clips['val'])} distinct held-out clips (every 10th of "
              f"{len(all_clips)})")
        n_eval = config['n_eval'] = len(clips['val'])
        n_vis = config['n_vis'] = min(n_vis, n_eval)
else:
    named_captions = [(f"synthetic task {task!r}", c) for c in fov_synthetic_captions(task)]
# counted in the run's tokenizer: here the default one; a loaded LLM's (init_gpt, or a checkpoint's run from one) after
# setup, when it is known
captions_checked = init_from == 'scratch' and not init_gpt
if captions_checked:
    fov_check_captions(named_captions, tok, caption_tokens)

# == the run (tests exec this file up to this line to get the definitions above) ==
run = setup(config, RECIPE, MODEL_KEYS)  # threads, DDP, autocast, seed + rank, run dir, the checkpoint's model keys
globals().update(config)                 # out_dir and the adopted model keys
device, master, ctx = run.device, run.master, run.ctx
logger = Logger(run, RECIPE, config, wandb_log, wandb_project, wandb_run_name)
latent_enc.to(device)

# the tokenizer: a loaded LLM's own (init_gpt; a run from the checkpoint of such a run reloads it from the source
# its meta names) with the recipe's special tokens appended, <|bos|> too where it has no BOS; else the default
llm, gpt_source = None, ''
if init_gpt or run.meta.get('gpt_source'):  # (pretrained.py only then: a fork of this recipe runs without it)
    import pretrained
    llm, llm_tok, SPECIALS, gpt_source = pretrained.recipe_llm(init_gpt, run, ['<|image|>', '<|eos|>', '<|pad|>'],
                                                               master)
if llm is not None:  # the source's shape, each key printed where the config differs
    shape = {k: getattr(llm.config, k) for k in ('n_layer', 'n_head', 'n_embd')}
    globals().update(adopt_checkpoint_config(dict(config=shape), config, shape, verbose=master))
elif gpt_source:  # the model is the checkpoint's (its meta holds the GPT's config, Llama fields and all)
    llm = GPT(GPTConfig(**run.meta['gpt']))
if gpt_source:
    tok = llm_tok
    IMG, EOS, PAD = tok['<|image|>'], tok['<|eos|>'], tok['<|pad|>']
    BOS = tok.bos if tok.bos is not None else tok['<|bos|>']
    llm.config.image_token_id = IMG
if not captions_checked:
    fov_check_captions(named_captions, tok, caption_tokens)

# a checkpoint dir or hf:owner/name gives the architecture from its meta; scratch and resume: the (adopted) config
raw_model, model_meta = build_model(run.meta if run.ckpt_src and not run.resume else None, llm)
raw_model.to(device)
set_checkpointing(raw_model, activation_checkpointing)
if vit_src and init_from == 'scratch':
    raw_model.vit.load_state_dict(vit_src[0].state_dict())
elif vit_init and init_from == 'scratch':
    fov_load_vit_init(raw_model.vit, vit_init)
if freeze_vit:
    raw_model.vit.requires_grad_(False)
if init_from == 'scratch':  # standardise latents with statistics of 64 training videos (a function of seed)
    with torch.no_grad():
        z = raw_model.latents(get_batch('train', range(10**6, 10**6 + 64))["latent_frames"], latent_enc)
        z = z[:, 1:].flatten(0, 1)
        raw_model.lat_mean.copy_(z.mean(0))
        raw_model.lat_std.copy_(z.std(0).clamp_min(1e-3))
optimizer = configure_optimizers(raw_model, lr, weight_decay, device_type=run.device_type)

step, clock = 0, Clock(max_train_seconds, device=device)
if run.ckpt_src:
    load_checkpoint(run.ckpt_src, raw_model, optimizer if run.resume else None)
    if run.resume:
        set_rng_state(run.meta['rng'])
    if run.resume or eval_only:  # the step and the seconds of training go on (0 for checkpoints without them)
        step, clock.seconds = run.meta.get('step', 0), run.meta.get('train_seconds', 0.0)
# video-only batches leave the LM head unused, so DDP must tolerate unused parameters
model = wrap(raw_model, compile and not plan, run, find_unused_parameters=True)
planner = MemoryPlan(run, raw_model, optimizer, batch_size, grad_accum_steps, plan_gpu_gib,
                     kv_cache_bytes(raw_model.gpt.config, eval_batch, raw_model.gpt.config.sequence_len,
                                    2 if run.dtype == 'bfloat16' else 4),
                     activation_checkpointing) if plan else None
n_params = sum(p.numel() for p in raw_model.parameters())
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"foveated: {n_params / 1e6:.2f}M params | task {task} | {query_mode} queries, temperature "
          f"{attn_temperature}, {n_passes} fine pass(es) | q_static std {raw_model.q_static.std().item():.2f} | "
          f"out {out_dir}")


def save(step):
    tokenizer = dict(gpt_source=gpt_source, specials=SPECIALS) if gpt_source else {}  # for own_tokenizer
    save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer,
                    meta=dict(recipe=RECIPE, step=step, config=config, rng=rng_state(), train_seconds=clock.seconds,
                              **model_meta, **tokenizer))


@torch.no_grad()
def evaluate(step):
    """Held-out videos 0..n_eval-1 in video-only mode, the fine queries rolled out from the model's own
    predictions; captions generated for the first n_caption_eval; the attention PNG of the first n_vis."""
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
    head = tuple(p.detach().float().cpu() for p in (raw_model.read_head.weight, raw_model.read_head.bias))
    glimpse_maps = None
    if raw_model.glimpse:  # the location maps of the fine queries and of the static one
        glimpse_maps = dict(fine=raw_model.glimpse_log_map(a["qf"][:, 1:]).exp(),
                            coarse=raw_model.glimpse_log_map(raw_model.q_static.detach().float().cpu()).exp()
                            .expand_as(a["af"][:, 1:]))
    m, per_frame = fov_metrics(a, image_size, patch_size, size, head if read_weight > 0 else None, glimpse_maps)
    example = None
    if n_caption_eval > 0:
        b = get_batch('val', range(min(n_caption_eval, n_eval)))
        with ctx:
            gen = raw_model.caption(b["frames"], caption_tokens + 1, n_passes)
        m.update(fov_caption_scores(gen, b["captions"]))
        example = dict(generated=gen[0], truth=b["captions"][0])
    png = None  # n_vis=0: no picture
    if n_vis > 0:
        png = fov_save_attention(get_batch('val', range(n_vis))["frames"], a["ac"], a["af"],
                                 os.path.join(out_dir, f"attention_{step:06d}.png"))
    raw_model.train()
    warnings = fov_hollow_warnings(m, (image_size // patch_size) ** 2)  # a diagnostic: 'met' is unchanged
    logger.eval(step, m, TARGETS, diagnostics=("loss_fine", "loss_coarse", "loss_mean", "target_att_fine",
                                               "target_att_coarse", "target_peak_fine", "target_peak_coarse",
                                               "caption_word_acc"),
                note="warning: " + "; ".join(w.split(":")[0].split(" (")[0] for w in warnings) if warnings else "",
                images={"attention": png}, n_eval=n_eval, train_seconds=clock.seconds, params=n_params,
                per_frame=per_frame, task=task, png=os.path.basename(png) if png else None, warnings=warnings,
                caption_example=example)


if eval_only:
    if master:
        evaluate(step)
    teardown(logger)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training

peak = run.matmul_peak() if master else None
n_patches = (image_size // patch_size) ** 2
videos_per_step = batch_size * grad_accum_steps * run.world_size
tokens_per_step = videos_per_step * n_frames * n_patches  # patch tokens encoded per step
# ~6 * params * tokens for the ViT encode, plus the GPT over one row per frame for the coarse and each fine pass
flops_per_step = 6 * (sum(p.numel() for p in raw_model.vit.parameters()) * tokens_per_step +
                      sum(p.numel() for p in raw_model.gpt.parameters()) * videos_per_step * n_frames * (1 + n_passes))
counts, start_step = {k: 0 for k in MODES}, step
while step < max_steps:
    clock.start()
    lr_now = get_lr(clock.lr_step(step, max_steps), max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    mode = fov_pick_mode(seed, step, mode_weights, MODES)  # one mode for the whole batch, a function of the step
    counts[mode] += 1
    # micro-batch m holds the videos a batch of batch_size * grad_accum_steps would; each one's loss is its mean / k
    k = grad_accum_steps
    batches = [get_batch('train', batch_indices(step * k + m, batch_size, run.rank, run.world_size)) for m in range(k)]
    caption_count = sum(caption_targets(b["captions"]) for b in batches) / k if mode == "caption" else None
    step_loss, parts = 0.0, {}
    for micro, b in enumerate(batches):
        with sync_grads(model, micro, k), plan_probe(planner):  # DDP all-reduces the gradients after the last only
            with ctx:
                tgt = raw_model.latents(b["latent_frames"], latent_enc)
                r = model(b["frames"], tgt, mode, b["captions"], n_passes, b["look"], b["target_patches"],
                          caption_count)
            loss = r["loss"] / k
            check_finite(loss, step)
            loss.backward()
        step_loss += loss.item()
        for name in ("loss_fine", "loss_coarse", "loss_caption", "loss_look"):  # rank 0's, for the log line
            if r[name] is not None:
                parts[name] = parts.get(name, 0.0) + r[name].item() / k
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if planner and planner.done():
        break
    dt = clock.stop()
    spent = clock.spent()  # every rank the same answer: they stop at one step
    last = step == max_steps or spent
    if step % log_interval == 0 or last:
        loss_avg = mean_across_ranks(step_loss, device)  # the global batch's loss (every rank joins)
        if master:
            extra = f"{mode:7s} | fine {parts['loss_fine']:.4f} | coarse {parts['loss_coarse']:.4f}"
            if "loss_caption" in parts:
                extra += f" | caption {parts['loss_caption']:.3f}"
            if "loss_look" in parts:
                extra += f" | look {parts['loss_look']:.3f}"
            print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens_per_step, flops_per_step, peak, extra))
            logger.log(dict(loss=loss_avg, loss_fine=parts['loss_fine'], loss_coarse=parts['loss_coarse'],
                            lr=lr_now), step)
    if master and (step % eval_interval == 0 or last):
        save(step)  # checkpoint first: a failing eval never loses training
        evaluate(step)
    if spent:
        if master:
            print(f"stopping at step {step}/{max_steps}: max_train_seconds={max_train_seconds:.0f} reached")
        break
if master:
    print(f"done: {step - start_step} steps | {clock.seconds:.0f} s of training in total (with a resume's earlier "
          f"runs) | batches per mode {counts}")
model = unwrap(model)  # drop the DDP wrapper before teardown: it holds the process group
teardown(logger, push_to_hub)
