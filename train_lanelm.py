"""
LaneLM: lane detection as language modelling. A small conv pyramid encodes the road image; its P5 features
(P3-P5 as an option) become prefix vision tokens of a small GPT, which writes each lane as a sequence of
coordinate tokens after a lane-id prompt:

    <|image|> x N   BOS_k   ROW_r   x_bin   dx dx dx ...   EOS        (one sequence per lane id k)

Inference prompts every lane id of an image in one batch and decodes greedily with the KV cache; decoded
lanes are scored with the official metric on held-out images (TuSimple: accuracy / FP / FN; CULane: F1 at
IoU 0.5 / 0.75 and mF1), next to the teacher-forced token accuracy (a large gap between the two means the
model copies the prefix rather than reading the image). Training adds an auxiliary per-lane-slot segmentation loss on P5 (aux_seg_weight; as
CLRNet/UFLD train their backbones): a dense signal telling the from-scratch encoder where each lane slot runs.
Experiment record and ablations: notes/lanelm.md.

    python train_lanelm.py                              # synthetic roads, 2-core CPU, <= 10 min
    python train_lanelm.py --overfit=True               # one image, 4 lanes: loss < 0.26, 4/4 decoded
    python train_lanelm.py config/lanelm_tusimple.py --data_root=/data/tusimple    # real TuSimple (GPU)
    python train_lanelm.py config/lanelm_culane.py --data_root=/data/culane        # real CULane (GPU)
    torchrun --standalone --nproc_per_node=8 train_lanelm.py config/lanelm_tusimple.py --data_root=/data/tusimple
    python train_lanelm.py --init_gpt=hf:HuggingFaceTB/SmolLM2-135M   # a pretrained LLM's blocks, fresh lane vocab
"""
import dataclasses
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint as recompute

from model import GPT, GPTConfig, InputError, Projector, gpt_flops_per_token, norm, set_checkpointing
from runtime import (Clock, Logger, MemoryPlan, check_finite, configure_optimizers, get_lr, global_mean,
                     install_error_hook, kv_cache_bytes, log_line, mean_across_ranks, plan_probe, set_lr, setup,
                     sync_grads, teardown, wrap)
from checkpoint import (adopt_checkpoint_config, dataclass_from_dict, load_checkpoint, rng_state, save_checkpoint,
                        set_rng_state, unwrap)
from data import batch_indices
from configurator import configure
from data_lanelm import (CULANE_H, CULANE_W, TUSIMPLE_H, TUSIMPLE_W, LaneData, LaneTokenizer, culane_from_grid,
                         culane_metrics, culane_row_grid, lane_draw, lane_draw_grid, lane_from_grid, lane_row_grid,
                         lane_seg_target, lane_slots, lane_to_grid, tusimple_metrics)

install_error_hook()  # before configure: bad input is one line on stderr, not a traceback

# -----------------------------------------------------------------------------
# config
out_dir = ''                 # '' -> out/lanelm-<timestamp>
init_from = 'scratch'        # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
overfit = False              # one training image with 4 lanes, repeated: loss must go < 0.26, 4/4 lanes decoded
overfit_steps = 300
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
torch_threads = 0            # 0 = auto (runtime.pick_threads: OMP_NUM_THREADS, else the cores per process)
# data: labels stay in the dataset's frame (TuSimple 1280x720, CULane 1640x590); images are resized to
# img_w x img_h for the model
dataset = 'synthetic'        # 'synthetic' | 'tusimple' | 'culane'
data_root = ''               # TuSimple root holding clips/ and the label files; CULane root holding list/
train_labels = 'label_data_0313.json,label_data_0531.json,label_data_0601.json'  # TuSimple label files or
val_labels = 'test_label.json'                                                   # CULane list files
img_w = 160
img_h = 96
max_lanes = 4                # lane ids (BOS tokens); TuSimple has up to 5 lanes per image
max_rows = 56                # ROW tokens: at least the row grid's length (TuSimple: 56)
h_step = 20                  # the row grid ROW tokens index, y = 160, 160 + h_step, ... < 720, the same in every
                             # image; the synthetic labels' rows (TuSimple's rows need 10; CULane: 590, 590 -
                             # h_step, ... >= 40)
# synthetic difficulty knobs (data_lanelm.lane_synthetic_sample; a harder scene in brackets)
syn_max_cars = 2             # vehicles occluding lane marks [3]
syn_max_shadows = 1          # shadow bands across the road [2]
syn_noise = 0.02             # max sensor noise std [0.04]
syn_lighting = 0.5           # scale of the brightness / contrast / colour / gamma jitter [1.0]
syn_dash_freq = 0.6          # dash cycles per unit ground depth [0.15-0.25: often no dash in the lower half]
syn_tilt = 1.0               # scale of the horizon (camera pitch) range, +-40 label px
# tokenizer
tokenization = 'relative_disjoint'  # 'relative_disjoint' | 'absolute' | 'relative'
nbins_x = 200
max_abs_dx = 32
# model
vis_levels = 'p5'            # 'p5' | 'p3p4p5'
conv_width = 16              # channels of the stem (P3 = 2x, P4 = 4x, P5 = 8x)
conv_norm = 'group'          # 'group' | 'batch' (group: no train/eval or DDP-rank gap)
aux_seg_weight = 1.0         # auxiliary per-slot lane segmentation loss on P5 (0 = off): the dense backbone
                             # supervision lane detectors train with (CLRNet, UFLD)
n_layer = 4
n_head = 4
n_embd = 128
init_gpt = ''                # a pretrained LLM (dir or hf:owner/name: this repo's GPT, nanochat, Llama family): its
                             #   transformer blocks and final norm, with their shape (n_layer, n_head, n_kv_head,
                             #   n_embd) and architecture; the embedding and head stay this recipe's lane-coordinate
                             #   vocabulary, freshly initialised (lanes are not text); '' = a GPT from scratch
# training
max_steps = 4300             # step-exact: about what 540 s of training reach on 2 CPU cores (notes/lanelm.md)
max_train_seconds = 0.0      # opt-in wall-clock training cap (0 = off): stops early, the LR follows whichever
                             # of steps / seconds is further along
batch_size = 8               # images per micro-batch and rank (x max_lanes sequences)
grad_accum_steps = 1         # micro-batches per step: a step trains on batch_size * grad_accum_steps images per rank
activation_checkpointing = False  # recompute each GPT block in the backward: less memory, ~1/3 more compute
plan = False                 # print the memory plan (two traced steps: runtime.MemoryPlan), then stop
plan_gpu_gib = 0.0           # the GPU size the plan fits the batch to (0: the visible GPU, else 80 GiB)
lr = 2e-3
min_lr_frac = 0.02
warmup_steps = 60
weight_decay = 0.05
grad_clip = 0.5
key_token_weight = 3.0       # loss weight of the first x, start-row and EOS tokens (1.0 = plain token mean)
log_interval = 50
eval_interval = 4300         # eval + checkpoint every N steps and at the end (default run: at the end only)
n_eval = 500                 # held-out images scored with the TuSimple (CULane) metric
n_eval_tf = 128              # held-out images for the teacher-forced token accuracy
eval_batch = 50              # images per decoding batch (x max_lanes prompts)
n_vis = 8                    # images drawn in the eval PNG (0: no PNG)
wandb_log = False
wandb_project = 'lanelm'
wandb_run_name = 'lanelm'
push_to_hub = ''            # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
config = configure(globals())
# -----------------------------------------------------------------------------

RECIPE = 'lanelm'
TARGETS = {"tusimple_acc": (">=", 0.95), "fp": ("<=", 0.05), "fn": ("<=", 0.05)}
CULANE_TARGETS = {"f1_50": (">=", 0.80)}  # CLRNet DLA34's CULane F1@50 (80.47); CLRerNet 81.43
OVERFIT_TARGETS = {"train_loss": ("<", 0.26), "lanes_decoded": (">=", 4)}
# keys that define the model: a checkpoint's values win over the command line when loading it
# (h_step: the row grid, i.e. which y each ROW token means)
MODEL_KEYS = ('img_w', 'img_h', 'max_lanes', 'max_rows', 'h_step', 'tokenization', 'nbins_x', 'max_abs_dx',
              'vis_levels', 'conv_width', 'conv_norm', 'n_layer', 'n_head', 'n_embd')

run = setup(config, RECIPE, MODEL_KEYS)  # threads, DDP, autocast, seed + rank, run dir, the checkpoint's model keys
globals().update(config)                 # out_dir and the adopted model keys
device, master, ctx = run.device, run.master, run.ctx
# init_gpt: the source's blocks and final norm decide the GPT's shape and architecture (each change printed); a run
# from a checkpoint rebuilds its GPT from the checkpoint's meta instead
GPT_SHAPE = ('n_layer', 'n_head', 'n_embd')  # config keys
BLOCK_ARCH = ('n_kv_head', 'mlp', 'intermediate_size', 'norm_gains', 'norm_eps', 'qk_norm', 'rope_base', 'input_norm')
LANE_VOCAB = ('transformer.wte.', 'lm_head.')  # the recipe's own: lane-coordinate ids, not the source's text
llm = None
if init_gpt and not run.ckpt_src:  # (pretrained.py only then: a fork of this recipe runs without it)
    import pretrained
    llm = pretrained.load_gpt(init_gpt)[0]
    adopt_checkpoint_config(dict(config={k: getattr(llm.config, k) for k in GPT_SHAPE}), config, GPT_SHAPE, master)
    globals().update({k: config[k] for k in GPT_SHAPE})
    if master:
        print(f"init_gpt {init_gpt}: its {n_layer} blocks and final norm, " +
              ", ".join(f"{k}={getattr(llm.config, k)!r}" for k in BLOCK_ARCH) +
              "; embedding and head: the lane vocabulary, freshly initialised")
gpt_source = run.meta.get('gpt_source', '') if run.ckpt_src else init_gpt  # recorded in each checkpoint's meta
if vis_levels not in ('p5', 'p3p4p5'):
    raise InputError(f"vis_levels must be 'p5' or 'p3p4p5', got {vis_levels!r}")
MIN_LANES = 2 if dataset == 'synthetic' else 1  # a synthetic scene has a lane on each side of the camera
if max_lanes < MIN_LANES:
    raise InputError(f"max_lanes must be >= {MIN_LANES} for dataset={dataset!r}, got {max_lanes}")
if n_embd % 4 or n_embd % (2 * n_head):
    raise InputError(f"n_embd ({n_embd}) must be a multiple of 4 (the 2D sin-cos positions) and of 2 * n_head "
                     f"({2 * n_head}: even rotary head dims)")
LABEL_W, LABEL_H = (CULANE_W, CULANE_H) if dataset == 'culane' else (TUSIMPLE_W, TUSIMPLE_H)
ROWS = culane_row_grid(h_step) if dataset == 'culane' else lane_row_grid(h_step)  # the y of each ROW token
if len(ROWS) > max_rows:
    raise InputError(f"h_step={h_step} gives a row grid of {len(ROWS)} rows > max_rows={max_rows}")
if overfit:  # one image, every step; eval = decode that image
    max_steps, batch_size, n_eval, n_eval_tf, warmup_steps, eval_interval = overfit_steps, 1, 1, 1, 20, overfit_steps
    max_train_seconds = 0.0
    config.update(max_steps=max_steps, batch_size=batch_size, n_eval=n_eval, n_eval_tf=n_eval_tf,
                  warmup_steps=warmup_steps, eval_interval=eval_interval, max_train_seconds=max_train_seconds)
tok = LaneTokenizer(tokenization, nbins_x, max_abs_dx, max_rows=max_rows, max_lanes=max_lanes, label_w=LABEL_W)
logger = Logger(run, RECIPE, config, wandb_log, wandb_project, wandb_run_name)

# -----------------------------------------------------------------------------
# data: every sample is a pure function of (seed, split, index) -> exact resume, DDP = one big batch

data = LaneData(dataset, seed, img_w, img_h, ROWS, max_lanes, data_root, train_labels, val_labels, overfit,
                max_cars=syn_max_cars, max_shadows=syn_max_shadows, noise=syn_noise, lighting=syn_lighting,
                dash_freq=syn_dash_freq, tilt=syn_tilt)
if data.n_val() is not None and n_eval > data.n_val():  # score each val image once, and say how many
    if master:
        print(f"note: n_eval={n_eval} > the {data.n_val()} val images: scoring all of them")
    n_eval = data.n_val()
    config.update(n_eval=n_eval)

# -----------------------------------------------------------------------------
# model: conv pyramid -> projector -> prefix vision tokens of a GPT


def conv_stage(cin, cout, second=True):
    Norm = (lambda c: nn.BatchNorm2d(c)) if conv_norm == 'batch' else (lambda c: nn.GroupNorm(8, c))
    # no conv bias before a norm: the norm subtracts it, its gradient is float noise that Adam would scale
    # up to full steps (and that noise differs between 1 and N DDP processes)
    layers = [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), Norm(cout), nn.GELU()]
    if second:
        layers += [nn.Conv2d(cout, cout, 3, 1, 1, bias=False), Norm(cout), nn.GELU()]
    return nn.Sequential(*layers)


def sincos_2d(h, w, dim):
    """(h * w, dim) fixed 2D sin-cos table: half the channels encode the row, half the column."""
    d = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(d) / d))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    parts = [f(t.reshape(-1, 1) * freq) for t in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


def gpt_config(n_vis):
    """A checkpoint's GPT as its meta records it; else the recipe's, with init_gpt's block architecture."""
    if run.ckpt_src:
        return dataclass_from_dict(GPTConfig, run.meta['gpt'])
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, n_embd=n_embd,
                    sequence_len=n_vis + 2 * max_rows + 4, image_token_id=tok.image)
    return dataclasses.replace(cfg, **{k: getattr(llm.config, k) for k in BLOCK_ARCH}) if llm else cfg


class LaneLM(nn.Module):
    """Conv pyramid with P3/P4/P5 at strides 4/8/16 of the model frame (160x96 -> P5 10x6 = 60 tokens).
    Input = RGB + 2 coordinate channels (x, y in [-1, 1]): lanes are positions, so make position explicit.
    Aux head (training only): P5 -> per-slot lane logits for 4x4 sub-cells (pixel shuffle to stride 4), so the
    P5 tokens the GPT reads must carry which lane slot passes where inside each cell."""

    def __init__(self):
        super().__init__()
        w = conv_width
        self.levels = ['p5'] if vis_levels == 'p5' else ['p3', 'p4', 'p5']
        self.stem = conv_stage(5, w, second=False)  # stride 2
        self.p3 = conv_stage(w, 2 * w)              # stride 4
        self.p4 = conv_stage(2 * w, 4 * w)          # stride 8
        self.p5 = conv_stage(4 * w, 8 * w)          # stride 16
        chans = dict(p3=2 * w, p4=4 * w, p5=8 * w)
        grid = {lv: (math.ceil(img_h / s), math.ceil(img_w / s)) for lv, s in (('p3', 4), ('p4', 8), ('p5', 16))}
        self.proj = nn.ModuleDict({lv: Projector(chans[lv], n_embd) for lv in self.levels})
        # 2D sin-cos positions at the scale of the features (learnable): attention can find "where" from step 0
        self.pos = nn.ParameterDict({lv: nn.Parameter(sincos_2d(*grid[lv], n_embd)) for lv in self.levels})
        self.n_vis = sum(grid[lv][0] * grid[lv][1] for lv in self.levels)
        self.seg_grid = (math.ceil(img_h / 4), math.ceil(img_w / 4))
        self.aux = nn.Conv2d(8 * w, (max_lanes + 1) * 16, 1)  # built even when off: checkpoints keep one layout
        self.gpt = GPT(gpt_config(self.n_vis))

    def vision(self, images, with_seg=False):
        """(B, 3, H, W) in [0, 1] -> (B, n_vis, n_embd) vision tokens, coarse-to-fine order P5 last
        (and with_seg: the aux head's (B, max_lanes + 1, H/4, W/4) lane-slot logits)."""
        B, _, H, W = images.shape
        ys = torch.linspace(-1, 1, H, device=images.device).view(1, 1, H, 1).expand(B, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=images.device).view(1, 1, 1, W).expand(B, 1, H, W)
        x = self.stem(torch.cat([(images - 0.5) / 0.25, xs, ys], 1))
        feats = {}
        feats['p3'] = x = self.p3(x)
        feats['p4'] = x = self.p4(x)
        feats['p5'] = self.p5(x)
        toks = torch.cat([self.proj[lv](feats[lv].flatten(2).transpose(1, 2)) + self.pos[lv] for lv in self.levels], 1)
        if not with_seg:
            return toks
        seg = F.pixel_shuffle(self.aux(feats['p5']), 4)[:, :, :self.seg_grid[0], :self.seg_grid[1]]
        return toks, seg

    def forward(self, images, idx, seg, pos, targets, key, seg_target, counts):
        """-> this micro-batch's shares of (loss to optimise: key tokens up-weighted + aux seg, plain mean token loss
        to report, aux seg loss). counts: loss_counts of the step's micro-batches."""
        # (aux_seg_weight=0 still computes the aux loss: cheap, and DDP sees every param used)
        vis, seg_logits = self.vision(images, with_seg=True)
        aux = global_mean(F.cross_entropy(seg_logits, seg_target, weight=seg_class_weights(images.device),
                                          reduction='sum'), counts['cells'], images.device)
        losses = packed_loss(self.gpt, idx, seg, pos, targets, vis, reduction='none').view(targets.shape)
        m, w = token_weights(targets, key)
        # means over the GLOBAL batch's tokens (global_mean) and the step's micro-batches (counts), so DDP and
        # accumulation reproduce one process's one batch exactly
        loss = global_mean((losses * w).sum(), counts['weighted'], images.device) + aux_seg_weight * aux
        return loss, global_mean((losses * m).sum().detach(), counts['tokens'], images.device), aux


def seg_class_weights(device):
    """The aux seg loss's class weights: background down-weighted as in CLRNet's seg loss (bg_weight 0.4), lane
    cells being ~5% of the grid."""
    cw = torch.ones(max_lanes + 1, device=device)
    cw[0] = 0.4
    return cw


def token_weights(targets, key):
    """-> (target mask, loss weights). The tokens that need the image most (start row, anchored x, EOS = lane
    present or not; `key`, marked by position in build_batch, so every tokenization weights the same tokens) are
    ~1/10 of the targets; without the weight the dx tokens dominate and the LM learns a blind prior first."""
    m = (targets >= 0).float()
    return m, m * (1 + (key_token_weight - 1) * key.float())


def loss_counts(micro):
    """This rank's denominators of the step's means, summed over its micro-batches (global_mean adds the other
    ranks'): k micro-batches of b weigh every token and seg cell as one batch of k * b does."""
    tokens = weighted = cells = 0
    for images, idx, seg, pos, y, key, seg_y in micro:
        m, w = token_weights(y, key)
        tokens, weighted = tokens + m.sum(), weighted + w.sum()
        cells = cells + seg_class_weights(seg_y.device)[seg_y].sum()
    return dict(tokens=tokens, weighted=weighted, cells=cells)


def packed_hidden(gpt, idx, seg, pos, vision):
    """The GPT on packed rows: one image's vision tokens, then all its lane sequences back to back.
    seg: 0 for image slots, k+1 for lane k, -1 for padding; pos: rotary position. Each lane attends
    (causally) to the image and to itself only, with positions n_vis, n_vis+1, ... exactly as its own
    [IMAGE]*n_vis + [BOS_k ...] sequence at inference: the same maths as max_lanes separate sequences,
    but the image prefix is computed once instead of max_lanes times (2x fewer tokens on CPU).
    (model.GPT.forward_embeds takes no custom mask/positions, so the block loop is repeated here.)"""
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    visible = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    mask = (causal[None] & visible) | torch.eye(T, dtype=torch.bool, device=idx.device)[None]
    cos, sin = gpt.cos[pos], gpt.sin[pos]
    x = gpt.embed(idx, vision)
    if gpt.config.input_norm:
        x = norm(x, gpt.config.norm_eps)
    for block in gpt.transformer.h:
        if gpt.checkpointing and torch.is_grad_enabled():  # activation checkpointing: recomputed in the backward
            x = recompute(block, x, cos, sin, mask[:, None], use_reentrant=False)
        else:
            x = block(x, cos, sin, mask[:, None])
    return gpt.transformer.ln_f(x)


def packed_loss(gpt, idx, seg, pos, targets, vision, reduction='mean'):
    logits = gpt.logits(packed_hidden(gpt, idx, seg, pos, vision))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


def build_batch(samples, n_vis):
    """Samples -> images (B, 3, H, W), packed rows (B, T): idx, seg, pos, targets, key (whether each target
    is a key token: LaneTokenizer.encode's with_key), and the aux per-slot lane masks (B, H/4, W/4).
    Row b = [IMAGE]*n_vis + [BOS_0 ROW points EOS] + [BOS_1 ...] + ... + PAD, lanes put on the row grid
    first. Targets are the next token of the same lane (-1 on image slots, on each EOS and on padding)."""
    images = torch.stack([s['image'] for s in samples])
    rows, masks, dropped = [], [], 0
    for s in samples:
        slots, n_drop = lane_slots(s['lanes'], max_lanes, centre=LABEL_W / 2)
        dropped += n_drop
        masks.append(lane_seg_target(slots, s['h_samples'], math.ceil(img_w / 4), math.ceil(img_h / 4), LABEL_W,
                                     LABEL_H))
        ids, seg, pos, key = [tok.image] * n_vis, [0] * n_vis, list(range(n_vis)), [False] * n_vis
        for k in range(max_lanes):
            xs = lane_to_grid(slots[k], s['h_samples'], ROWS) if slots[k] is not None else [-2.0] * len(ROWS)
            lane, lane_key = tok.encode(xs, k, with_key=True)
            ids, seg, key = ids + lane, seg + [k + 1] * len(lane), key + lane_key
            pos = pos + list(range(n_vis, n_vis + len(lane)))
        rows.append((ids, seg, pos, key))
    T = max(len(r[0]) for r in rows)
    idx = torch.full((len(rows), T), tok.pad, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    is_key = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (a, b, c, d) in enumerate(rows):
        idx[i, :len(a)], seg[i, :len(b)], pos[i, :len(c)] = torch.tensor(a), torch.tensor(b), torch.tensor(c)
        is_key[i, :len(d)] = torch.tensor(d)
    targets = torch.full_like(idx, -1)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets[:, :-1] = torch.where(same, idx[:, 1:], torch.full_like(idx[:, 1:], -1))
    key = torch.zeros_like(is_key)
    key[:, :-1] = is_key[:, 1:] & same  # the target at t is the token at t + 1
    return images, idx, seg, pos, targets, key, torch.from_numpy(np.stack(masks)), dropped


def conv_flops(module, H, W):
    """Forward FLOPs of the conv pyramid for one image (2 * MACs), counted with hooks once, in eval mode:
    a train-mode forward would move BatchNorm's running statistics (a loaded checkpoint's too)."""
    was_training, total = module.training, []
    module.eval()
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(2 * o.numel() * m.in_channels * m.kernel_size[0]
                                                                 * m.kernel_size[1] // m.groups))
             for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module.vision(torch.zeros(1, 3, H, W, device=next(module.parameters()).device))
    for h in hooks:
        h.remove()
    module.train(was_training)
    return sum(total)


@torch.no_grad()
def check_packing(model):
    """Packed training rows must give the logits of separate [IMAGE]*n_vis + [BOS_k ...] sequences (the
    inference layout); a mismatch here would mean training and decoding see different models."""
    model.eval()
    n = min(2, data.n_val() or 2)
    batch = build_batch([data.get('val', i) for i in range(n)], model.n_vis)
    images, idx, seg, pos = [t.to(device) for t in batch[:4]]
    vis = model.vision(images)
    packed = model.gpt.logits(packed_hidden(model.gpt, idx, seg, pos, vis))
    for b in range(n):
        for k in range(max_lanes):
            cols = (seg[b] == k + 1).nonzero().squeeze(1)
            alone = torch.cat([idx[b, :model.n_vis], idx[b, cols]])[None]
            logits, _ = model.gpt(alone, vision_embeds=vis[b:b + 1])
            err = (logits[0, model.n_vis:] - packed[b, cols]).abs().max().item()
            if err > 1e-3:
                raise RuntimeError(f"packed rows differ from separate lane sequences by {err:.2e} (lane {k})")
    model.train()


raw_model = LaneLM().to(device)
if llm:  # the source's blocks and final norm, every key accounted for; the lane vocabulary's rows stay fresh
    fresh = {k: v for k, v in raw_model.gpt.state_dict().items() if k.startswith(LANE_VOCAB)}
    blocks = {k: v for k, v in llm.state_dict().items() if not k.startswith(LANE_VOCAB)}
    pretrained.assign(raw_model.gpt, {**blocks, **fresh}, init_gpt)
    llm = None
set_checkpointing(raw_model, activation_checkpointing)
check_packing(raw_model)
N_VIS = raw_model.n_vis
optimizer = configure_optimizers(raw_model, lr, weight_decay, device_type=run.device_type)
step, clock = 0, Clock(max_train_seconds, device=device)
if run.ckpt_src:
    meta = load_checkpoint(run.ckpt_src, raw_model, optimizer if run.resume else None)
    if run.resume or eval_only:  # eval_only reports the step (and training time) the checkpoint is at
        step, clock.seconds = meta['step'], meta.get('train_seconds', 0.0)
    if run.resume:
        set_rng_state(meta['rng'])
n_params = sum(p.numel() for p in raw_model.parameters())
flops_per_image = 3 * conv_flops(raw_model, img_h, img_w)  # forward + backward
flops_per_token = gpt_flops_per_token(raw_model.gpt.config, raw_model.gpt.num_params(exclude_embedding=True))
if master:
    print(f"LaneLM: {n_params / 1e6:.2f}M params, {N_VIS} vision tokens ({vis_levels}), device {device}, "
          f"{run.dtype}, {run.threads} threads, out_dir {out_dir}")
    print(f"tokenizer {tok.describe()}")
model = wrap(raw_model, compile and not plan, run)  # compile, then DDP; raw_model decodes, evaluates and is saved
planner = MemoryPlan(run, raw_model, optimizer, batch_size, grad_accum_steps, plan_gpu_gib,
                     kv_cache_bytes(raw_model.gpt.config, eval_batch * max_lanes, raw_model.gpt.config.sequence_len,
                                    2 if run.dtype == 'bfloat16' else 4),
                     activation_checkpointing) if plan else None

# -----------------------------------------------------------------------------
# eval: rollout (KV-cache greedy decoding per lane-id prompt) + teacher-forced token accuracy


@torch.no_grad()
def decode_lanes(images, h_samples):
    """(B, 3, H, W), h_samples per image -> (per image its decoded lanes (x per h_samples row, -2 absent),
    n invalid sequences). All lane ids of all images go in one batch: prompt = [IMAGE]*n_vis + [BOS_k];
    lanes are decoded on the row grid, then read at each image's rows."""
    B = images.shape[0]
    with ctx:
        vis = raw_model.vision(images.to(device)).repeat_interleave(max_lanes, 0)
        prompts = torch.tensor([[tok.image] * N_VIS + [tok.bos(k)] for _ in range(B) for k in range(max_lanes)],
                               device=device)
        max_new = len(ROWS) + 2 + (len(ROWS) if tokenization == 'relative' else 0)
        out = raw_model.gpt.generate(prompts, max_new, vision_embeds=vis, temperature=0.0, eos_id=tok.eos,
                                     suppress_ids=[tok.pad] + [tok.bos(k) for k in range(max_lanes)])
    lanes, invalid = [], 0
    for b in range(B):
        lanes.append([])
        for k in range(max_lanes):
            xs, ok = tok.decode(out[b * max_lanes + k].tolist(), len(ROWS))
            invalid += not ok
            lanes[-1].append(lane_from_grid(xs, h_samples[b], ROWS))
    return lanes, invalid


@torch.no_grad()
def teacher_forced(samples):
    """Token accuracy and loss with the ground-truth prefix: how well the model predicts the next token when
    it never has to recover from its own mistakes (an upper bound for the rollout)."""
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(samples), eval_batch):
        batch = build_batch(samples[i:i + eval_batch], N_VIS)[:5]
        images, idx, seg, pos, y = [t.to(device) for t in batch]
        with ctx:
            logits = raw_model.gpt.logits(packed_hidden(raw_model.gpt, idx, seg, pos, raw_model.vision(images)))
        m = y >= 0
        correct += int((logits.argmax(-1)[m] == y[m]).sum())
        loss_sum += float(F.cross_entropy(logits[m].float(), y[m], reduction='sum'))
        total += int(m.sum())
    return correct / max(total, 1), loss_sum / max(total, 1)


def save(step):
    save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer,
                    meta=dict(recipe=RECIPE, step=step, config=config, rng=rng_state(), train_seconds=clock.seconds,
                              gpt=vars(raw_model.gpt.config), tokenizer=tok.describe(), n_vis=N_VIS,
                              gpt_source=gpt_source))


def evaluate(step):
    """Decode n_eval held-out images (the overfit image in overfit mode) and score them; the teacher-forced
    accuracy on n_eval_tf of them; a PNG of the first n_vis; then the eval line, results.json, evals.jsonl."""
    raw_model.eval()
    preds, gts, ys, invalid, panels, points, categories = [], [], [], 0, [], [], []
    for i in range(0, n_eval, eval_batch):
        samples = [data.get('val', j) for j in range(i, min(n_eval, i + eval_batch))]
        lanes, bad = decode_lanes(torch.stack([s['image'] for s in samples]), [s['h_samples'] for s in samples])
        invalid += bad
        for s, pred in zip(samples, lanes):
            preds.append(pred)
            gts.append(s['lanes'])  # every gt lane, all-absent ones too: LaneEval scores the label file as is
            ys.append(s['h_samples'])
            if len(panels) < n_vis:
                panels.append(lane_draw(s['image'], s['h_samples'], gt=gts[-1], pred=preds[-1], label_w=LABEL_W,
                                        label_h=LABEL_H))
            if dataset == 'culane':  # scored on the labelled points, predictions as (x, y) points
                points.append(s['points'])
                categories.append(data.categories.get(s['raw_file']))
    if dataset == 'culane':
        metrics = culane_metrics([[culane_from_grid(xs, ROWS) for xs in p] for p in preds], points,
                                 categories if data.categories else None)
    else:
        metrics = tusimple_metrics(preds, gts, ys)
    metrics['invalid_seq'] = invalid / (len(preds) * max_lanes)
    metrics['tf_token_acc'], metrics['val_loss_tf'] = teacher_forced([data.get('val', j)
                                                                      for j in range(min(n_eval_tf, n_eval))])
    if losses:  # the plain token loss of the last 10 training steps (this rank's)
        metrics['train_loss'] = float(np.mean(losses[-10:]))
    png = lane_draw_grid(panels, os.path.join(out_dir, f'val_{step:05d}.png'))
    raw_model.train()
    if dataset == 'culane':
        targets, diagnostics = CULANE_TARGETS, ('f1_75', 'mf1', 'precision', 'recall', 'tf_token_acc', 'invalid_seq',
                                                'train_loss')
    else:
        targets, diagnostics = TARGETS, ('f1', 'tf_token_acc', 'invalid_seq', 'train_loss')
    if overfit:
        found = metrics['recall'] if dataset == 'culane' else 1 - metrics['fn']
        metrics['lanes_decoded'] = round(len(points[0] if dataset == 'culane' else gts[0]) * found)
        targets, diagnostics = OVERFIT_TARGETS, (('f1_50', 'precision', 'recall') if dataset == 'culane' else
                                                 ('tusimple_acc', 'fp', 'fn')) + ('tf_token_acc',)
    logger.eval(step, metrics, targets, diagnostics=diagnostics, images={'val': png},
                note='the overfit training image' if overfit else f'{n_eval} held-out images',
                split='train[overfit]' if overfit else 'val', n_eval=n_eval, train_seconds=round(clock.seconds, 1),
                params=n_params)


losses, dropped = [], 0  # plain training losses (this rank's), lanes left without a lane-id slot
if eval_only:
    if master:
        evaluate(step)
    model = unwrap(model)
    teardown(logger)  # nothing trained: nothing to push
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training loop

peak = run.matmul_peak() if master else None
model.train()
log_step, log_seconds = step, clock.seconds  # the ms/step printed: training seconds since the last log line
while step < max_steps:
    clock.start()
    lr_now = get_lr(clock.lr_step(step, max_steps), max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    micro = []  # micro-batch m of step s: the samples of a batch of batch_size * grad_accum_steps
    for m in range(grad_accum_steps):
        indices = batch_indices(step * grad_accum_steps + m, batch_size, run.rank, run.world_size)
        *batch, n_drop = build_batch([data.get('train', i) for i in indices], N_VIS)
        dropped += n_drop
        micro.append([t.to(device) for t in batch])
    counts = loss_counts(micro)
    loss = plain_loss = aux_loss = 0.0  # the step's: its micro-batches' shares summed
    for m, (images, idx, seg, pos, y, key, seg_y) in enumerate(micro):
        with sync_grads(model, m, grad_accum_steps), plan_probe(planner):  # DDP reduces once, in the last backward
            with ctx:
                share, plain_share, aux_share = model(images, idx, seg, pos, y, key, seg_y, counts)
            check_finite(share, step)
            share.backward()
        loss, plain_loss, aux_loss = loss + share.detach(), plain_loss + plain_share, aux_loss + aux_share.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(plain_loss.item())
    step += 1
    if planner and planner.done():
        break
    dt = clock.stop()
    out_of_time = clock.spent()  # every rank stops at the same step
    last = step == max_steps or out_of_time
    if step % log_interval == 0 or last:
        loss_avg = mean_across_ranks(plain_loss.item(), device)  # the global batch's loss (every rank joins)
        aux_avg = mean_across_ranks(aux_loss.item(), device)
        if master:
            tokens = sum(b[1].numel() for b in micro) * run.world_size  # the whole step's
            flops = flops_per_token * tokens + flops_per_image * sum(b[0].shape[0] for b in micro) * run.world_size
            avg = (clock.seconds - log_seconds) / max(1, step - log_step)
            print(log_line(step, max_steps, loss_avg, lr_now, avg, tokens, flops, peak,
                           extra=f"aux seg {aux_avg:.3f}" if aux_seg_weight > 0 else ""))
        log_step, log_seconds = step, clock.seconds
        logger.log(dict(loss=loss_avg, loss_weighted=loss.item(), aux_seg=aux_avg, lr=lr_now), step)
    if master and (step % eval_interval == 0 or last):
        save(step)  # checkpoint first: a failing eval never loses training
        evaluate(step)
    if out_of_time:
        if master:
            print(f"stopping at step {step}/{max_steps}: max_train_seconds={max_train_seconds:.0f} reached")
        break
if master:
    if dropped:
        print(f"note: {dropped} lanes had no lane-id slot (max_lanes={max_lanes}) and were left out of training "
              "targets")
    print(f"done: {step} steps, {clock.seconds:.0f}s training, results in {out_dir}/results.json")
model = unwrap(model)  # drop the DDP wrapper before teardown: it holds the process group
teardown(logger, push_to_hub)
