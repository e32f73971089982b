"""
nano DeepSeek-OCR: a DeepEncoder (SAM-like windowed ViT -> neck -> two stride-2 convs -> CLIP-like ViT
fed those features -> concat -> projector) in front of the shared GPT, trained to read text from images.

    python train_ocr.py                         # synthetic documents, 2-core CPU
    python train_ocr.py --overfit=True          # tier 1: 10 samples, must reach 10/10 exact
    python train_ocr.py --stage=2 --init_encoder=out/ocr-.../encoder   # SAM frozen, fresh GPT
    python train_ocr.py config/ocr_fox.py       # GPU scale: SAM ViT-B, CLIP ViT-L, d20 GPT, 1024 px

Prompt: <|bos|> <|image|> x ((q+1)*q+1) "\\nFree OCR." -> text <|eos|>. The image token is special (inserted
by id, never generated). Every eval prints rollout metrics (generated text, not teacher-forced) and a
collapse monitor: the mean pairwise cosine similarity of pooled vision features at the SAM, CLIP and
projected stages over a fixed probe set (noise, white, black, a text page); the origin run collapsed there
(0.02 -> 0.90) and then answered every page with the same stock text. The small models here collapsed the
same way within a few hundred steps, so the projected tokens are batch-centred (BatchCenter) by default.
"""
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import install_error_hook
install_error_hook()
from model import (GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, embed_patches, gpt_flops_per_token)
from runtime import (WandbLogger, autocast_ctx, budget_lr_step, budget_spent, check_finite, cleanup_distributed,  # noqa: E402
                     configure_optimizers, get_lr, global_mean, init_distributed, log_line, maybe_compile,
                     mean_across_ranks, measure_matmul_peak, set_lr, sync)
from checkpoint import (adopt_checkpoint_config, check_repo_id, dataclass_from_dict, load_checkpoint, load_meta,  # noqa: E402
                        push_run_to_hub, rng_state, run_dir, save_checkpoint, set_rng_state, unwrap)
from data import (Tokenizer, batch_indices, format_metrics, load_image, normalize, save_png,  # noqa: E402
                  write_results)
from data_ocr import (OCR_GLYPH_CLASSES, OCR_TOKEN_SLOTS, fox_word_metrics, ocr_draw_predictions, ocr_metrics, ocr_probe_images,  # noqa: E402
                      ocr_pairwise_cosine, ocr_read_fox, ocr_read_jsonl, ocr_read_omnidocbench, ocr_shared_spread,
                      ocr_synthetic_sample)

# -----------------------------------------------------------------------------
# config (defaults = config/ocr_synthetic.py: the 2-core CPU run)
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
# data
dataset = 'synthetic'      # 'synthetic' | 'jsonl' (train_data/val_data) | 'fox' | 'omnidocbench' (val_data)
train_data = ''
val_data = ''
image_root = ''            # folder of val_data's images ('' = the reader's default: fox and jsonl the file's folder,
                           #   omnidocbench images/ beside it)
image_size = 64
font_sizes = (10, 11)
max_lines = 3
noise = 0.04
paper = (200, 255)         # paper grey level range (0-255)
ink = (0, 90)              # ink grey level range
pitch = 7                  # > 0: typewriter layout, one character per `pitch` px cell (0: proportional)
line_gap = 16              # > 0: lines on a fixed grid `line_gap` px apart (0: random line positions)
max_text_tokens = 48       # longer targets are cut (and counted); also the generation budget
# DeepEncoder: SAM-like windowed ViT -> neck -> 2 stride-2 convs -> CLIP-like ViT -> concat -> projector
sam_patch = 4
sam_dim = 64
sam_layers = 2
sam_heads = 4
sam_window = 8             # window size in patches (0 = global everywhere)
sam_global = (1,)          # layers with global attention (SAM ViT-B: 2, 5, 8, 11)
neck_dim = 32              # SAM neck width; the convs give 2x then 4x this, which is CLIP's width
clip_layers = 1
clip_heads = 4
center_vision = True       # BatchCenter the projected vision tokens (the anti-collapse fix; False = DeepSeek's path)
glyph_weight = 1.0         # stage 1 on synthetic typewriter pages (pitch > 0): weight of a per-patch "which character
                           #   is here" cross-entropy on SAM's last block (0 = off; no labels on real data)
slot_weight = 1.0          # ... and of "which characters does this vision token cover, left to right" on the
                           #   projected tokens (3 slots per token; 0 = off)
# GPT
n_layer = 3
n_head = 4
n_kv_head = 4
n_embd = 128
tokenizer = 'bytes'        # data.Tokenizer base: 'bytes' or a tiktoken name available offline
# stages
stage = 1                  # 1: everything trainable; 2: SAM frozen, encoder from init_encoder
init_encoder = ''          # encoder-only checkpoint dir (saved by stage 1 as <out_dir>/encoder)
init_gpt = ''              # GPT checkpoint dir; a vocab without <|image|> is grown by one row
text_ratio = 0.0           # share of text-only batches (DDP then needs find_unused_parameters)
# training
overfit = False            # tier 1: train and evaluate on the first 10 training samples
overfit_steps = 300
max_steps = 9000           # ~85 ms/step on a quiet 2-core CPU (2 threads); max_train_seconds caps it
max_train_seconds = 750.0   # > 0: wall-clock budget of the training loop; the LR decays on steps or time,
                            # whichever is further along, then the final eval runs (0 = steps only, reproducible)
batch_size = 16
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 25
eval_interval = 1500
n_eval = 200
eval_batch = 100
collapse_warn = 0.95
bench_tokens = 32          # KV-cache vs recomputation generation benchmark at the end (0 = skip)
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'ocr'
push_to_hub = ''            # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
if push_to_hub:
    check_repo_id(push_to_hub)

RECIPE = 'ocr'
TARGETS = {"ned": ("<=", 0.05), "fox_precision": (">=", 0.95), "collapse_cos": ("<", 0.95)}
# the model's shape: a run from a checkpoint takes these from it, and says so
MODEL_KEYS = ("image_size", "sam_patch", "sam_dim", "sam_layers", "sam_heads", "sam_window", "sam_global", "neck_dim",
              "clip_layers", "clip_heads", "center_vision", "n_layer", "n_head", "n_kv_head", "n_embd", "max_text_tokens")
PROMPT = "\nFree OCR."

# -----------------------------------------------------------------------------
# DeepEncoder


@dataclass
class EncoderConfig:
    image_size: int = 64     # defaults: the script's (the CPU run's) shapes
    sam_patch: int = 4
    sam_dim: int = 64
    sam_layers: int = 2
    sam_heads: int = 4
    sam_window: int = 8
    sam_global: tuple = (1,)
    neck_dim: int = 32
    clip_layers: int = 1
    clip_heads: int = 4
    out_dim: int = 128       # the GPT width
    center: bool = True      # BatchCenter on the projected tokens (False: DeepSeek-OCR's plain path)
    glyph_classes: int = 0   # > 0: a per-patch character classifier on SAM's last block (the glyph loss)
    token_slots: int = 0     # > 0 (with glyph_classes): each projected token classifies the characters it covers

    @property
    def q(self):
        """Vision tokens per side: image / patch / 4 (the two stride-2 convs)."""
        return self.image_size // self.sam_patch // 4


def vision_token_count(image_size, patch_size, downsample=4):
    """(q+1)*q+1: q rows of q tokens, a newline token after each row, one view separator at the end.
    273 for DeepSeek-OCR's base mode (1024 px, patch 16, downsample 4)."""
    q = image_size // patch_size // downsample
    return (q + 1) * q + 1


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):  # (B, C, H, W), normalised over C
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def window_partition(x, w):
    """(B, H, W, C) -> (B * windows, w, w, C), zero-padding H, W up to multiples of w (as SAM does)."""
    B, H, W, C = x.shape
    ph, pw = (w - H % w) % w, (w - W % w) % w
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, C), (Hp, Wp)


def window_unpartition(x, w, padded, hw):
    (Hp, Wp), (H, W) = padded, hw
    B = x.shape[0] // (Hp // w * Wp // w)
    x = x.view(B, Hp // w, Wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W].contiguous()


class SAMBlock(nn.Module):
    """Pre-norm ViT block on a (B, H, W, C) grid; attention inside w x w windows, or global (w = 0)."""

    def __init__(self, dim, n_head, window):
        super().__init__()
        self.n_head, self.window = n_head, window
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, H, W, C = x.shape
        h = self.ln_1(x)
        if self.window:
            h, padded = window_partition(h, self.window)
        b, hh, ww, _ = h.shape
        q, k, v = self.qkv(h).view(b, hh * ww, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh, ww, C))
        if self.window:
            y = window_unpartition(y, self.window, padded, (H, W))
        x = x + y
        return x + self.mlp(self.ln_2(x))


class SAMEncoder(nn.Module):
    """Patch embed -> windowed/global blocks -> neck (1x1, 3x3 convs + LayerNorm2d) -> net_2, net_3
    (3x3 stride-2 convs): 16x fewer tokens, 4x the neck width. DeepSeek-OCR counts net_2/net_3 as SAM."""

    def __init__(self, c):
        super().__init__()
        g = c.image_size // c.sam_patch
        self.patch = nn.Conv2d(3, c.sam_dim, c.sam_patch, stride=c.sam_patch)
        self.pos = nn.Parameter(torch.zeros(1, g, g, c.sam_dim))
        self.blocks = nn.ModuleList([SAMBlock(c.sam_dim, c.sam_heads, 0 if i in c.sam_global else c.sam_window)
                                     for i in range(c.sam_layers)])
        n = c.neck_dim
        self.neck = nn.Sequential(nn.Conv2d(c.sam_dim, n, 1, bias=False), LayerNorm2d(n),
                                  nn.Conv2d(n, n, 3, padding=1, bias=False), LayerNorm2d(n))
        self.net_2 = nn.Conv2d(n, 2 * n, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(2 * n, 4 * n, 3, stride=2, padding=1, bias=False)
        # training aid, not part of DeepSeek-OCR: "which character is under this patch?" read off SAM's last
        # block. Inside SAM, so stage 2 freezes it with the rest.
        self.glyph = nn.Linear(c.sam_dim, c.glyph_classes) if c.glyph_classes else None

    def forward(self, images, glyphs=False):
        """-> (B, q*q, 4*neck) tokens, and with glyphs=True also (B, g, g, glyph_classes) glyph logits."""
        x = embed_patches(images, self.patch) + self.pos
        for block in self.blocks:
            x = block(x)
        glyph_logits = self.glyph(x) if glyphs else None
        x = self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))
        x = x.flatten(2).transpose(1, 2)
        return (x, glyph_logits) if glyphs else x


class AllReduceSum(torch.autograd.Function):
    """Sum over DDP ranks whose gradient is the sum of every rank's gradient (so centring stays DDP-exact)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class BatchCenter(nn.Module):
    """Subtracts the image-independent part of every vision token: the mean over the batch per position
    and channel (a running mean at eval). Without it the small models here reproduced the journal's collapse
    within a few hundred steps: the features grew a large component shared by all images (std 16 vs 0.04
    across images) that the GPT used as constant tokens, and every page got the same answer. Centred, the
    GPT only ever sees what differs between images. Centring needs a global batch of >= 2 images (one image
    minus its own mean is zero): under DDP one image per rank is enough, and a 1-image run is refused at setup."""

    def __init__(self, n_tokens, dim, momentum=0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(n_tokens, dim))

    def forward(self, x):
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        n = x.shape[0] * (torch.distributed.get_world_size() if ddp else 1)
        if self.training and n > 1:
            total = x.sum(0)
            if ddp:  # the global batch's mean (with gradient), like SyncBatchNorm
                total = AllReduceSum.apply(total)
            mean = total / n
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            return x - mean
        return x - self.running_mean.to(x.dtype)


class DeepEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.image_size % (c.sam_patch * 4):
            raise InputError(f"image_size {c.image_size} must be a multiple of 4 * sam_patch ({4 * c.sam_patch})")
        self.config = c
        self.sam = SAMEncoder(c)
        # CLIP-like ViT fed the SAM features: patch_embed=False, so it has no patch embedding that would
        # never receive a gradient (the origin's DDP "parameter 182 did not receive grad" error)
        self.clip = ViT(ViTConfig(patch_embed=False, num_tokens=c.q * c.q, n_embd=4 * c.neck_dim,
                                  n_layer=c.clip_layers, n_head=c.clip_heads))
        self.projector = Projector(8 * c.neck_dim, c.out_dim)
        self.center = BatchCenter(c.q * c.q, c.out_dim) if c.center else nn.Identity()
        self.image_newline = nn.Parameter(torch.randn(c.out_dim) * c.out_dim ** -0.5)
        self.view_separator = nn.Parameter(torch.randn(c.out_dim) * c.out_dim ** -0.5)
        # training aid like SAM's glyph head: the characters of each token's area, slot by slot, read linearly
        # off what the GPT will see (so the compressor must keep them apart)
        self.slot_head = nn.Linear(c.out_dim, c.token_slots * c.glyph_classes) if c.glyph_classes and c.token_slots else None

    def features(self, images, glyphs=False):
        """images (B, 3, S, S) normalised -> dict of (B, q*q, C) at the sam, clip and projected stages
        (+ 'glyphs', SAM's per-patch character logits, with glyphs=True)."""
        sam, glyph_logits = self.sam(images, glyphs=True) if glyphs else (self.sam(images), None)
        clip = self.clip(sam)
        out = dict(sam=sam, clip=clip, proj=self.center(self.projector(torch.cat([clip, sam], -1))))
        if not glyphs:
            return out
        q, c = self.config.q, self.config
        slots = None if self.slot_head is None else self.slot_head(out["proj"]).view(-1, q, q, c.token_slots, c.glyph_classes)
        return dict(out, glyphs=glyph_logits, slots=slots)

    def layout(self, proj):
        """(B, q*q, D) -> (B, (q+1)*q+1, D): a newline token after each row, one view separator."""
        B, _, D = proj.shape
        q = self.config.q
        rows = torch.cat([proj.view(B, q, q, D), self.image_newline.expand(B, q, 1, D)], 2).reshape(B, -1, D)
        return torch.cat([rows, self.view_separator.expand(B, 1, D)], 1)

    def forward(self, images, glyphs=False):
        """-> (B, (q+1)*q+1, D) vision embeddings, and with glyphs=True also dict(glyphs=SAM's per-patch
        logits, slots=the projected tokens' per-slot logits or None)."""
        f = self.features(images, glyphs)
        return (self.layout(f["proj"]), dict(glyphs=f["glyphs"], slots=f["slots"])) if glyphs else self.layout(f["proj"])


class OCRModel(nn.Module):
    """DeepEncoder + GPT. images=None is a text-only batch (the encoder is then unused)."""

    def __init__(self, encoder, gpt):
        super().__init__()
        self.encoder, self.gpt = encoder, gpt

    def forward(self, idx, targets, images=None, loss_reduction="mean", aux=None):
        """-> (logits, loss); with aux labels dict(glyphs=(B, g, g), slots=(B, q, q, slots)) also a dict of the
        auxiliary cross-entropies summed over labelled cells (the caller normalises, like the summed text loss)."""
        if aux is None:
            vision = None if images is None else self.encoder(images)
            return self.gpt(idx, targets, vision_embeds=vision, loss_reduction=loss_reduction)
        vision, aux_logits = self.encoder(images, glyphs=True)
        logits, loss = self.gpt(idx, targets, vision_embeds=vision, loss_reduction=loss_reduction)
        sums = {k: F.cross_entropy(aux_logits[k].reshape(-1, aux_logits[k].shape[-1]).float(), aux[k].flatten(),
                                   ignore_index=-1, reduction="sum") for k in aux if aux_logits.get(k) is not None}
        return logits, loss, sums


def load_gpt_into(src, vocab_size, image_token_id, n_embd):
    """A GPT checkpoint (meta['gpt']) for the OCR model. A vocab without <|image|> (a text LM) grows the
    embedding and head to vocab_size, old rows kept; image_token_id is then set."""
    src_cfg = dataclass_from_dict(GPTConfig, load_meta(src)['gpt'])
    if src_cfg.n_embd != n_embd:
        raise InputError(f"init_gpt {src} has n_embd {src_cfg.n_embd} but the encoder projects to {n_embd}")
    gpt = GPT(src_cfg)
    load_checkpoint(src, gpt)
    if src_cfg.vocab_size < vocab_size:
        print(f"init_gpt: vocab {src_cfg.vocab_size} lacks <|image|> (id {image_token_id}): growing the "
              f"embedding and head to {vocab_size}")
        gpt.resize_token_embeddings(vocab_size)
    if image_token_id >= gpt.config.vocab_size:
        raise InputError(f"image token id {image_token_id} is outside the GPT vocab {gpt.config.vocab_size}")
    gpt.config.image_token_id = image_token_id
    return gpt


def encoder_flops(enc, glyphs=False):
    """Training FLOPs per image, each module counted at the positions it runs at: SAM's patch embedding, blocks
    and neck on its g x g grid, net_2 on (g/2)^2, net_3, CLIP, the projector and the slot head on q x q. 6 per
    weight entry (conv kernels included) and position, plus attention's 12 x keys x width per position and layer
    (PaLM's accounting, as gpt_flops_per_token); a frozen module (stage 2's SAM) runs forward only: a third of
    that. Biases, norms and position embeddings are adds, not matmuls: left out."""
    c, sam = enc.config, enc.sam
    g, q = c.image_size // c.sam_patch, c.q

    def cost(module, positions, keys=0, width=0):
        weights = [p for n, p in module.named_parameters() if p.dim() >= 2 and n != 'pos']
        per = 6 if any(p.requires_grad for p in module.parameters()) else 2
        return per * positions * (sum(p.numel() for p in weights) + 2 * keys * width)

    total = cost(sam.patch, g * g) + cost(sam.neck, g * g) + cost(sam.net_2, (2 * q) ** 2) + cost(sam.net_3, q * q)
    total += sum(cost(b, g * g, (b.window or g) ** 2, c.sam_dim) for b in sam.blocks)
    total += cost(enc.clip, q * q, q * q * len(enc.clip.blocks), 4 * c.neck_dim) + cost(enc.projector, q * q)
    if glyphs:
        total += cost(sam.glyph, g * g) + (cost(enc.slot_head, q * q) if enc.slot_head is not None else 0)
    return total


# -----------------------------------------------------------------------------
# setup (everything above is definitions; tests/test_ocr.py executes the file up to this line)


ddp_info = init_distributed(device)
device, device_type, master = ddp_info['device'], ddp_info['device_type'], ddp_info['master']
ctx, dtype_name = autocast_ctx(device_type, dtype)
torch.manual_seed(seed + ddp_info['rank'])
if overfit:
    max_steps, n_eval, max_train_seconds = overfit_steps, 10, 0.0
if stage not in (1, 2):
    raise InputError(f"stage must be 1 or 2, got {stage}")
DATASETS = ('synthetic', 'jsonl', 'fox', 'omnidocbench')
if dataset not in DATASETS:
    raise InputError(f"unknown dataset {dataset!r}: one of {', '.join(DATASETS)}")
if dataset != 'synthetic' and not val_data and not overfit:  # (overfit evaluates on its 10 training pages)
    raise InputError(f"dataset={dataset!r} evaluates on val_data= (its {dataset} annotation file), which is not set")
if stage == 2 and not init_encoder and init_from in ('scratch', ''):
    raise InputError("stage=2 trains on a stage-1 encoder: pass --init_encoder=<out_dir>/encoder")
out_dir = run_dir(out_dir, RECIPE, init_from)
tok = Tokenizer(base=tokenizer)
IMAGE, BOS, EOS, PAD = tok['<|image|>'], tok['<|bos|>'], tok['<|eos|>'], tok['<|pad|>']


def load_items(kind, path, root=None):
    return dict(jsonl=ocr_read_jsonl, fox=ocr_read_fox, omnidocbench=ocr_read_omnidocbench)[kind](path, root)


# real sets are lists of {image, text}, read (and every image checked) before the model is built
real = {}
if dataset != 'synthetic':
    if train_data:
        real['train'] = ocr_read_jsonl(train_data)
    if val_data:
        real['val'] = load_items(dataset, val_data, image_root or None)
    if 'train' not in real and (overfit or not eval_only):  # (overfit trains and evaluates on train_data)
        raise InputError(f"dataset={dataset!r} needs train_data= (a JSONL of {{image, text}}) to train")


def build_model(meta=None):
    """From a checkpoint's meta, or from this config."""
    if meta is not None:
        enc_cfg = dataclass_from_dict(EncoderConfig, meta['encoder'])
        enc_cfg.sam_global = tuple(enc_cfg.sam_global)
        gpt_cfg = dataclass_from_dict(GPTConfig, meta['gpt'])
    else:
        enc_cfg = EncoderConfig(image_size, sam_patch, sam_dim, sam_layers, sam_heads, sam_window, tuple(sam_global),
                                neck_dim, clip_layers, clip_heads, n_embd, center_vision,
                                OCR_GLYPH_CLASSES if use_glyphs else 0, OCR_TOKEN_SLOTS if use_glyphs and slot_weight > 0 else 0)
        gpt_cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                            n_embd=n_embd, sequence_len=vision_token_count(image_size, sam_patch) + 16 + max_text_tokens,
                            image_token_id=IMAGE)
    return OCRModel(DeepEncoder(enc_cfg), GPT(gpt_cfg))


resume = init_from == 'resume'
meta = None
if init_from != 'scratch':  # resume (weights and optimizer loaded below), a checkpoint dir or hf:owner/name
    meta = load_meta(os.path.join(out_dir, 'ckpt') if resume else init_from)
    if meta.get('recipe') != RECIPE:
        raise InputError(f"init_from={init_from!r} is not an OCR checkpoint (recipe {meta.get('recipe')!r})")
    # a resume or an eval also takes the checkpoint's stage: a stage-2 run resumed as stage 1 would unfreeze SAM
    # (and no longer match its optimizer state), and an eval would record the wrong stage
    keys = MODEL_KEYS + (('stage',) if resume or eval_only else ())
    globals().update(adopt_checkpoint_config(meta, config, keys, verbose=master,
                                             absent=dict(stage=meta.get('stage', 1))))
# the glyph loss needs character positions: synthetic typewriter pages only, and a trainable SAM (stage 1)
use_glyphs = glyph_weight > 0 and dataset == 'synthetic' and pitch > 0 and stage == 1
model = build_model(meta)
if meta is not None and not resume:
    load_checkpoint(init_from, model)
if init_encoder and not resume:
    enc_meta = load_meta(init_encoder)
    if enc_meta.get('kind') != 'deepencoder':
        raise InputError(f"init_encoder {init_encoder} is not an encoder-only checkpoint (meta kind {enc_meta.get('kind')!r})")
    enc_cfg = dataclass_from_dict(EncoderConfig, enc_meta['encoder'])
    enc_cfg.sam_global = tuple(enc_cfg.sam_global)
    model.encoder = DeepEncoder(enc_cfg)
    load_checkpoint(init_encoder, model.encoder)
    if enc_cfg.out_dim != model.gpt.config.n_embd:
        raise InputError(f"encoder projects to {enc_cfg.out_dim} but the GPT has n_embd {model.gpt.config.n_embd}")
if init_gpt and not resume:
    model.gpt = load_gpt_into(init_gpt, tok.vocab_size, IMAGE, model.encoder.config.out_dim)
enc, gpt = model.encoder, model.gpt
if isinstance(enc.center, BatchCenter) and not eval_only and not overfit and batch_size * ddp_info['world_size'] < 2:
    raise InputError("center_vision subtracts the batch's mean from every image: it needs a global batch of >= 2 "
                     "images (one image would be centred to zero); raise batch_size or pass --center_vision=False")
if stage == 2:  # SAM (with neck, net_2, net_3) frozen, as DeepSeek-OCR stage 2
    enc.sam.requires_grad_(False)
    if enc.slot_head is not None:  # a stage-1 training aid, like SAM's glyph head
        enc.slot_head.requires_grad_(False)
model.to(device)
glyph_on = use_glyphs and enc.sam.glyph is not None  # (a checkpoint without the head trains without it)
q = enc.config.q
N_VISION = vision_token_count(enc.config.image_size, enc.config.sam_patch)
n_params = sum(p.numel() for p in model.parameters())
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
if master:
    print(f"DeepEncoder {sum(p.numel() for p in enc.parameters()) / 1e6:.2f}M (SAM {sum(p.numel() for p in enc.sam.parameters()) / 1e6:.2f}M"
          f", CLIP {sum(p.numel() for p in enc.clip.parameters()) / 1e6:.2f}M) + GPT {gpt.num_params() / 1e6:.2f}M"
          f" | trainable {n_train / 1e6:.2f}M | stage {stage} | {N_VISION} vision tokens ({q}x{q} + {q} newlines + 1)")

# -----------------------------------------------------------------------------
# data: synthetic pages are a pure function of (seed, split, index); real sets were read at setup


n_truncated = 0


def get_sample(split, index):
    if overfit:
        split, index = 'train', index % 10  # tier 1: the same 10 training pages, train and eval
    if dataset == 'synthetic':
        return ocr_synthetic_sample(seed, split, index, image_size, tuple(font_sizes), max_lines, noise,
                                    paper=tuple(paper), ink=tuple(ink), pitch=pitch, line_gap=line_gap,
                                    glyph_patch=enc.config.sam_patch if glyph_on else 0)
    items = real[split]
    item = items[index % len(items)]
    return dict(image=load_image(item['image'], enc.config.image_size), text=item['text'], id=item['id'])


def prompt_ids():
    return [BOS] + [IMAGE] * N_VISION + tok.encode(PROMPT)


def make_batch(samples, text_only=False):
    """-> (idx, targets, images, aux). Loss only on the answer (and <|eos|>); right-padded with targets -1.
    aux: the samples' glyph and slot labels when they all have them, else None."""
    global n_truncated
    seqs, starts = [], []
    for s in samples:
        ans = tok.encode(s['text'])
        if len(ans) > max_text_tokens:
            ans, n_truncated = ans[:max_text_tokens], n_truncated + 1
        head = [BOS] if text_only else prompt_ids()
        seqs.append(head + ans + [EOS])
        starts.append(len(head) - 1)  # the first position whose target is an answer token
    T = max(len(s) for s in seqs) - 1
    idx = torch.full((len(seqs), T), PAD, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, st:len(s) - 1] = torch.tensor(s[st + 1:])
    images = None if text_only else normalize(torch.stack([s['image'] for s in samples]))
    aux = None
    if not text_only and all('glyphs' in s for s in samples):
        aux = {k: torch.from_numpy(np.stack([s[k] for s in samples])).to(device) for k in ('glyphs', 'slots')}
    return idx.to(device), targets.to(device), None if images is None else images.to(device), aux


def is_text_batch(step):
    """Text-only batches at rate text_ratio: a function of (seed, step), so every rank agrees."""
    return text_ratio > 0 and np.random.default_rng([seed, 7, step]).random() < text_ratio


def train_batch(step):
    if overfit:
        return make_batch([get_sample('train', i) for i in range(10)])
    idxs = batch_indices(step, batch_size, ddp_info['rank'], ddp_info['world_size'])
    text_only = is_text_batch(step)
    return make_batch([get_sample('train', i) for i in idxs], text_only)

# -----------------------------------------------------------------------------
# eval: generated text (rollout), collapse monitor, per-sample table in overfit mode


@torch.no_grad()
def generate_text(images, max_new=None, use_cache=True, stop=True):
    """Batched greedy OCR: vision embeddings computed once, prefilled once into the KV cache."""
    with ctx:
        vision = enc(normalize(images.to(device)))
    idx = torch.tensor([prompt_ids()] * images.shape[0], device=device)
    with ctx:
        out = gpt.generate(idx, max_new or max_text_tokens + 1, vision_embeds=vision, eos_id=EOS if stop else None,
                           suppress_ids=[BOS, PAD], use_cache=use_cache)
    texts = []
    for row in out.tolist():
        row = row[:row.index(EOS)] if EOS in row else row
        texts.append(tok.decode(row))
    return texts, out


@torch.no_grad()
def collapse_monitor():
    """Over the probe set: the mean pairwise cosine of mean-pooled features at each stage, and shared_spread of
    the projected tokens (what the GPT reads)."""
    names, probe = ocr_probe_images(enc.config.image_size)
    with ctx:
        feats = enc.features(normalize(probe.to(device)))
    shared, spread = ocr_shared_spread(feats["proj"])
    return {f"cos_{k}": ocr_pairwise_cosine(v.mean(1)) for k, v in feats.items()}, \
        dict(proj_shared_rms=shared, proj_spread_rms=spread)


@torch.no_grad()
def per_sample_losses(samples):
    idx, targets, images, _ = make_batch(samples)
    with ctx:
        _, loss = gpt(idx, targets, enc(images), loss_reduction='none')
    loss = loss.view(targets.shape)
    return ((loss * (targets >= 0)).sum(1) / (targets >= 0).sum(1)).tolist()


@torch.no_grad()
def evaluate(step):
    model.eval()
    preds, gts, images, ids = [], [], [], []
    n = min(n_eval, len(real['val'])) if 'val' in real and not overfit else n_eval
    for start in range(0, n, eval_batch):
        samples = [get_sample('val', i) for i in range(start, min(n, start + eval_batch))]
        batch = torch.stack([s['image'] for s in samples])
        texts, _ = generate_text(batch)
        preds += texts
        gts += [s['text'] for s in samples]
        ids += [s['id'] for s in samples]
        images += [s['image'] for s in samples[:max(0, 16 - len(images))]]
    metrics = ocr_metrics(preds, gts)
    # the origin's collapsed checkpoints answered every page alike: count distinct answers
    metrics['distinct_outputs'] = len(set(preds)) / len(preds)
    cos, spread = collapse_monitor()
    metrics.update(cos)
    metrics['collapse_cos'] = max(cos.values())
    metrics.update(spread)
    if metrics['collapse_cos'] > collapse_warn:
        print(f"WARNING: vision features collapsing: pooled cosine over the probe set {cos} > {collapse_warn}")
    if overfit:
        losses = per_sample_losses([get_sample('train', i) for i in range(10)])
        print(f"{'id':<10} {'loss':>8} {'overlap':>8}  exact")
        for i, (p, g, l) in enumerate(zip(preds, gts, losses)):
            print(f"{ids[i]:<10} {l:8.4f} {100 * fox_word_metrics(p, g)['fox_precision']:7.0f}%  {'yes' if p == g else 'NO'}")
        metrics['exact_count'] = sum(p == g for p, g in zip(preds, gts))
    png = save_png(ocr_draw_predictions(images, preds[:len(images)], gts[:len(images)]),
                   os.path.join(out_dir, f"ocr_step{step:06d}.png"))
    model.train()
    return metrics, png, list(zip(ids, preds, gts))


@torch.no_grad()
def bench_generation():
    """Greedy generation of bench_tokens tokens for 8 held-out pages, with the KV cache and by full
    recomputation: tokens/s of each, the speedup, and whether the two outputs agree."""
    model.eval()
    images = torch.stack([get_sample('val', i)['image'] for i in range(8)])
    res = {}
    for name, cache in (('cache', True), ('recompute', False)):
        generate_text(images[:2], 4, cache, stop=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        _, out = generate_text(images, bench_tokens, cache, stop=False)
        sync(device)
        res[name] = (out, images.shape[0] * bench_tokens / (time.perf_counter() - t0))
    model.train()
    return dict(gen_tok_s=res['cache'][1], gen_tok_s_recompute=res['recompute'][1],
                kv_speedup=res['cache'][1] / res['recompute'][1],
                kv_match=float(torch.equal(res['cache'][0], res['recompute'][0])))

# -----------------------------------------------------------------------------
# training


optimizer = configure_optimizers(model, lr, weight_decay, device_type=device_type)
start_step = 0
if resume:
    ck = load_checkpoint(os.path.join(out_dir, 'ckpt'), model, optimizer)
    set_rng_state(ck['rng'])
    start_step = ck['step']
    print(f"resumed {out_dir} at step {start_step}")
raw_model = model
model = maybe_compile(model, compile, device_type)
if ddp_info['ddp']:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # text-only batches skip the whole encoder, a glyph head left unused skips itself: only then must DDP look
    # for unused parameters
    model = DDP(model, device_ids=[ddp_info['local_rank']] if device_type == 'cuda' else None,
                find_unused_parameters=text_ratio > 0 or (not glyph_on and any(
                    h is not None and h.weight.requires_grad for h in (enc.sam.glyph, enc.slot_head))))
logger = WandbLogger(wandb_log and master, wandb_project, wandb_run_name, config, out_dir)
peak = measure_matmul_peak(device, torch.bfloat16 if dtype_name == 'bfloat16' else torch.float32) if master else None
enc_flops = encoder_flops(enc, glyph_on)
gpt_flops_tok = gpt_flops_per_token(gpt.config, gpt.num_params(exclude_embedding=True))


def save_all(step, train_seconds):
    """train_seconds: the training loop's time so far, which a resume continues (its budget and LR clock)."""
    ck_meta = dict(recipe=RECIPE, step=step, config=config, rng=rng_state(), stage=stage, train_seconds=train_seconds,
                   encoder=asdict(enc.config), gpt=asdict(gpt.config))
    save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer, meta=ck_meta)
    if stage == 1:  # encoder-only checkpoint (no gpt.* keys) for stage 2 with a fresh or pretrained GPT
        save_checkpoint(os.path.join(out_dir, 'encoder'), enc,
                        meta=dict(kind='deepencoder', step=step, encoder=asdict(enc.config), config=config))


def run_eval(step, train_seconds, final=False):
    """Saves the checkpoint first (a failing eval must not lose the training), then evaluates; the metrics go to
    results.json."""
    if not eval_only:
        save_all(step, train_seconds)
    metrics, png, rows = evaluate(step)
    if final and bench_tokens:
        metrics.update(bench_generation())
    print(f"eval step {step}: " + format_metrics(metrics, TARGETS))
    if n_truncated:
        print(f"note: {n_truncated} training targets longer than max_text_tokens={max_text_tokens} were cut")
    write_results(out_dir, RECIPE, 'val', len(rows), metrics, TARGETS, step=step, train_seconds=train_seconds,
                  device=device, dtype=dtype_name, params=n_params, config=config, stage=stage,
                  samples=[dict(id=i, pred=p, gt=g) for i, p, g in rows[:20]])
    logger.log(metrics, step, images={"predictions": png})
    return metrics


if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"out_dir {out_dir} | device {device} | dtype {dtype_name}")
# a resumed run continues the training clock it was stopped on (max_train_seconds, the LR's time axis and
# results.json's train_seconds all count the total); checkpoints from before the key resume at 0
prior_seconds = float(meta.get('train_seconds', 0.0)) if resume else 0.0
if eval_only:
    if master:  # reported at the evaluated checkpoint's step and seconds (a checkpoint dir's too, not 0)
        run_eval(meta.get('step', 0) if meta else 0, float(meta.get('train_seconds', 0.0)) if meta else 0.0, final=True)
    raise SystemExit(0)

train_seconds, t_last = prior_seconds, time.perf_counter()
loss_acc, aux_acc, n_acc, n_aux = 0.0, {}, 0, 0
model.train()
t_start = time.perf_counter() - prior_seconds
for step in range(start_step, max_steps):
    lr_now = get_lr(budget_lr_step(step, max_steps, time.perf_counter() - t_start, max_train_seconds, device),
                    max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    idx, targets, images, aux = train_batch(step)
    with ctx:
        _, loss_sum, *aux_sums = model(idx, targets, images, loss_reduction="sum", aux=aux)
    loss = global_mean(loss_sum, (targets != -1).sum(), device)  # per token of the global batch (DDP-exact)
    total = loss
    for k, v in (aux_sums[0] if aux_sums else {}).items():  # per labelled cell of the global batch
        aux_loss = global_mean(v, (aux[k] != -1).sum(), device)
        total = total + (glyph_weight if k == 'glyphs' else slot_weight) * aux_loss
        aux_acc[k] = aux_acc.get(k, 0.0) + aux_loss.item()
    check_finite(total, step)
    total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_acc, n_acc, n_aux = loss_acc + loss.item(), n_acc + 1, n_aux + bool(aux_sums)  # (text-only batches: no aux)
    if (step + 1) % log_interval == 0:
        loss_avg = mean_across_ranks(loss_acc / n_acc, device)  # the global batch's loss (every rank joins)
    if (step + 1) % log_interval == 0 and master:
        sync(device)
        dt = (time.perf_counter() - t_last) / n_acc
        train_seconds += time.perf_counter() - t_last
        tokens = idx.numel() * ddp_info['world_size']
        flops = gpt_flops_tok * tokens + enc_flops * idx.shape[0] * ddp_info['world_size'] * (images is not None)
        aux_avg = {f"{k}_loss": v / n_aux for k, v in aux_acc.items()}  # rank 0's (diagnostics; loss is global)
        print(log_line(step + 1, max_steps, loss_avg, lr_now, dt, tokens, flops, peak,
                       extra=" | ".join(f"{k} {v:.4f}" for k, v in aux_avg.items())))
        logger.log(dict(loss=loss_avg, lr=lr_now, **aux_avg), step + 1)
        t_last = time.perf_counter()
    if (step + 1) % log_interval == 0:
        loss_acc, aux_acc, n_acc, n_aux = 0.0, {}, 0, 0
    out_of_time = budget_spent(time.perf_counter() - t_start, max_train_seconds, device)
    last = step + 1 == max_steps or out_of_time
    if ((step + 1) % eval_interval == 0 or last) and master:
        train_seconds += time.perf_counter() - t_last
        run_eval(step + 1, train_seconds, final=last)
        t_last = time.perf_counter()
    if ddp_info['ddp'] and (step + 1) % eval_interval == 0:
        torch.distributed.barrier()
    if out_of_time:
        if master:
            print(f"stopping at step {step + 1}/{max_steps}: max_train_seconds={max_train_seconds:.0f} reached")
        break

if master and push_to_hub:
    push_run_to_hub(push_to_hub, out_dir, RECIPE, config)
logger.finish()
model = unwrap(model)  # drop the DDP wrapper first: it holds the process group, which must not outlive teardown
cleanup_distributed()
