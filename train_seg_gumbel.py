"""
[SEG] referring segmentation + pseudo-Gumbel mask captioning (DESIGN.md section 5, seeds/003).

A small VLM (ViT -> projector -> GPT) with a light SAM-style mask decoder learns, in stage A,
  referring segmentation  <|bos|> <|image|>*N caption [SEG]           -> mask from the [SEG] hidden state
  region captioning       <|bos|> <|image|>*N <vp> <|image|>*K </vp>  -> caption <|eos|>
and then, in stage B, the journal's six-step pseudo-Gumbel loop, which trains segmentation *through* the
model's own captions: (1) an EMA teacher greedily captions the region (no grad); (2) 25% of those tokens are
masked; (3) the trainable model gives logits for them; (4) straight-through top-k Gumbel-softmax turns the
logits into one-hots whose backward is the soft sample's, and one-hots @ embedding matrix = text embeddings;
(5) [SEG] (by id) is appended and the mask predicted from those embeddings; (6) BCE + Dice, backprop into the
trainable model only, EMA update.

    python train_seg_gumbel.py                              # synthetic default, CPU, <= 15 min
    python train_seg_gumbel.py config/seg_refcoco.py        # RefCOCO-style JSON, GPU scale
"""
import copy
import math
import os
import time

# OpenMP threads that spin while waiting made every step ~10x slower on a shared (loaded) 2-core CPU
# (measured: 166 s vs 14 s for the same work); passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

from runtime import install_error_hook
install_error_hook()
from model import GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, gpt_flops_per_token, left_pad
from runtime import (WandbLogger, autocast_ctx, check_finite, configure_optimizers, grad_norm, get_lr,
                     cleanup_distributed, init_distributed, log_line, maybe_compile, mean_across_ranks,
                     measure_matmul_peak, set_lr)
from checkpoint import (adopt_checkpoint_config, dataclass_from_dict, load_checkpoint, load_meta,
                        resolve_checkpoint, all_rng_states, run_dir, save_checkpoint, check_repo_id,
                        push_run_to_hub, set_rng_state, unwrap)
from data import Tokenizer, batch_indices, epoch_order, format_metrics, normalize, save_png, write_results
from data_seg import (SEG_SPECIALS, seg_caption_token_accuracy, seg_check_context_counts, seg_ciou, seg_collate,
                      seg_giou, seg_iou_stats, seg_load_record, seg_panel, seg_panels, seg_prompt_ids,
                      seg_read_refcoco, seg_region_cells, seg_synthetic_sample, seg_vp_prompt_ids)

RECIPE = "seg_gumbel"
# checked on the final (stage-B) eval: its gIoU >= 0.85, its drop from the stage-A gIoU <= 0.02, and a cycle-IoU
# gain over stage A (the stage-A gIoU itself is reported as giou_stage_a, not checked)
TARGETS = {"giou": (">=", 0.85), "giou_drop": ("<=", 0.02), "cycle_iou_gain": (">", 0.0)}
# the model's shape: a run from a checkpoint takes these from it, and says so (image_size: the ViT's position table)
MODEL_KEYS = ("image_size", "patch_size", "llm_grid", "vit_layers", "vit_embd", "vit_heads", "n_layer", "n_embd",
              "n_head", "n_kv_head", "dec_dim")

# -----------------------------------------------------------------------------
# config (every key can be set from config/*.py or --key=value)
out_dir = ""
init_from = "scratch"        # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = "auto"
dtype = "auto"
compile = False
# data
dataset = "synthetic"        # 'synthetic' | 'refcoco'
train_json = ""              # RefCOCO-style JSON (dataset='refcoco')
val_json = ""
image_root = ""              # relative image/mask paths resolve here ('' = the JSON's folder)
image_size = 32
max_caption_len = 16         # tokens (bytes); longer referring sentences are cut
vp_grid = 16                 # the visual prompt: region mask pooled to vp_grid x vp_grid, K = cells > 0.5
captioned_pool = 3000        # synthetic: > 0 = stage A draws from only this many captioned training scenes (as
                             # RefCOCO is small) while stage B draws fresh scenes and uses their masks only (as the
                             # journal's SA-1B/SAV masks had no captions); 0 = both stages draw fresh scenes
# model
patch_size = 4
llm_grid = 4                 # the GPT sees the ViT features average-pooled to llm_grid x llm_grid tokens
vit_layers = 2
vit_embd = 128
vit_heads = 4
n_layer = 3
n_embd = 128
n_head = 4
n_kv_head = 4
dec_dim = 64                 # mask decoder width
# schedule: stage A for stage_a_steps, then stage B until max_steps
stage_a_steps = 700
max_steps = 1200
batch_size = 32
lr = 2e-3
lr_b = 5e-4                  # stage B learning rate (its own cosine from lr_b)
min_lr_frac = 0.1
warmup_steps = 50
weight_decay = 0.05
grad_clip = 1.0
caption_weight = 1.0         # stage A: mask loss + caption_weight * caption cross-entropy
# stage B (pseudo-Gumbel)
gumbel_tau = 0.7
gumbel_top_k = 16            # 0 = the full vocabulary
mask_ratio = 0.25
ema_decay = 0.99
distill_weight = 1.0         # + CE of the trainable logits on the teacher's pseudo tokens (0 = the bare six steps)
grad_norm_interval = 10      # log the text-embedding gradient norm every N stage-B steps
# eval / logging
log_interval = 25
eval_interval = 350
n_eval = 256
eval_batch_size = 64
n_vis = 6
wandb_log = False
wandb_project = "vlm"
wandb_run_name = "seg_gumbel"
push_to_hub = ''            # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
if push_to_hub:
    check_repo_id(push_to_hub)

tok = Tokenizer(specials=SEG_SPECIALS)
BOS, EOS, PAD, IMG = tok["<|bos|>"], tok["<|eos|>"], tok["<|pad|>"], tok["<|image|>"]
SEG, VP, VP_END, MASK = tok["[SEG]"], tok["<vp>"], tok["</vp>"], tok["<mask>"]
INPUT_ONLY = [BOS, PAD, SEG, VP, VP_END, MASK]  # never generated (the image token is banned by GPT.generate)

# -----------------------------------------------------------------------------
# data


_records = {}


def records(split):
    if split not in _records:
        path = train_json if split == "train" else val_json
        if not path:
            raise InputError(f"dataset='refcoco' needs --{'train' if split == 'train' else 'val'}_json=")
        _records[split] = seg_read_refcoco(path, image_root or None)
    return _records[split]


def get_batch(split, indices, dev, stage="A"):
    if dataset == "synthetic":
        if split == "train" and captioned_pool > 0:  # A: the captioned pool, again and again; B: scenes past it
            indices = [i % captioned_pool if stage == "A" else captioned_pool + i for i in indices]
        samples = [seg_synthetic_sample(seed, split, i, image_size) for i in indices]
    elif dataset == "refcoco":
        recs = records(split)
        if split == "train":  # a fresh permutation per epoch, the same on every rank
            picks = [epoch_order(len(recs), seed, i // len(recs))[i % len(recs)] for i in indices]
        else:
            picks = [i % len(recs) for i in indices]
        samples = [seg_load_record(recs[j], image_size) for j in picks]
    else:
        raise InputError(f"dataset must be 'synthetic' or 'refcoco', got {dataset!r}")
    b = seg_collate(samples)
    return dict(images=b["images"].to(dev), masks=b["masks"].to(dev), captions=b["captions"],
                caption_ids=[tok.encode(c)[:max_caption_len] for c in b["captions"]],
                cells=seg_region_cells(b["masks"], vp_grid).to(dev))

# -----------------------------------------------------------------------------
# the model: ViT -> projector -> GPT, visual-prompt rows, SAM-style mask decoder


class MaskDecoder(nn.Module):
    """Light SAM-style decoder: the [SEG] state becomes one output token; a two-way attention layer lets it
    read the image features (and writes it back into them); the features are upsampled to the input
    resolution, summed with a small full-resolution conv of the pixels (for crisp edges), and the mask is the
    dot product of a hypernetwork MLP of the token with every pixel's features (SAM's mask head)."""

    def __init__(self, d_text, d_img, d=64, heads=4):
        super().__init__()
        self.token_in, self.img_in = nn.Linear(d_text, d), nn.Linear(d_img, d)
        self.t2i = nn.MultiheadAttention(d, heads, batch_first=True)
        self.i2t = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm_t, self.norm_f = nn.LayerNorm(d), nn.LayerNorm(d)
        c = d // 4
        self.coarse = nn.Conv2d(d, c, 1)
        self.pixels = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))
        self.fuse = nn.Sequential(nn.GELU(), nn.Conv2d(c, c, 3, padding=1))
        self.hyper = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, c))

    def forward(self, seg_h, feats, images):
        B, N, _ = feats.shape
        s = int(math.isqrt(N))
        t, f = self.token_in(seg_h)[:, None], self.img_in(feats)
        t = self.norm_t(t + self.t2i(t, f, f, need_weights=False)[0])
        t = t + self.mlp(t)
        f = self.norm_f(f + self.i2t(f, t, t, need_weights=False)[0])
        f = f.transpose(1, 2).reshape(B, -1, s, s)
        up = F.interpolate(self.coarse(f), size=images.shape[-2:], mode="bilinear", align_corners=False)
        up = self.fuse(up + self.pixels(images))
        return torch.einsum("bc,bchw->bhw", self.hyper(t[:, 0]), up)


class SegVLM(nn.Module):
    def __init__(self, vit_cfg, gpt_cfg, dec_dim, llm_grid):
        super().__init__()
        self.llm_grid = llm_grid
        self.vit, self.gpt = ViT(vit_cfg), GPT(gpt_cfg)
        self.proj = Projector(vit_cfg.n_embd, gpt_cfg.n_embd)
        self.vp_type = nn.Parameter(torch.zeros(gpt_cfg.n_embd))  # marks a row as a region cell, not the image
        self.decoder = MaskDecoder(gpt_cfg.n_embd, vit_cfg.n_embd, dec_dim)

    def encode(self, images):
        """-> (ViT features (B, N, Cv) for the decoder and the visual prompt, image rows for the GPT
        (B, llm_grid**2, D)). The GPT gets a pooled view: the decoder localises from the full-resolution
        features, so the language model only needs to know what is in the picture (4x fewer tokens)."""
        feats = self.vit.encode(normalize(images))["features"]
        B, N, C = feats.shape
        s = int(math.isqrt(N))
        pooled = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(B, C, s, s), self.llm_grid)
        return feats, self.proj(pooled.flatten(2).transpose(1, 2))

    def vp_rows(self, feats, cells):
        """The visual prompt's embeddings: features resampled to the g x g grid, one row per selected cell.
        Returns a list of (K_b, D); K_b = cells[b].sum() exactly, 0 included."""
        B, N, C = feats.shape
        s, g = int(math.isqrt(N)), int(math.isqrt(cells.shape[1]))
        grid = F.interpolate(feats.transpose(1, 2).reshape(B, C, s, s), size=(g, g), mode="bilinear",
                             align_corners=False).flatten(2).transpose(1, 2)
        rows = self.proj(grid) + self.vp_type
        return [rows[b][cells[b]] for b in range(B)]

    def forward(self, kind, **kw):  # one entry point, so DDP sees every trainable forward
        return {"stage_a": stage_a_loss, "stage_b": stage_b_loss}[kind](self, **kw)


def build_model(meta=None):
    """From this run's config, or from a checkpoint's meta (init_from=<dir>|hf:)."""
    if meta is not None:
        vit_cfg, gpt_cfg = dataclass_from_dict(ViTConfig, meta["vit"]), dataclass_from_dict(GPTConfig, meta["gpt"])
        args = (vit_cfg, gpt_cfg, meta["dec_dim"], meta["llm_grid"])
        return nn.ModuleDict(dict(student=SegVLM(*args), teacher=SegVLM(*args)))
    vit_cfg = ViTConfig(image_size=image_size, patch_size=patch_size, n_layer=vit_layers, n_head=vit_heads,
                        n_embd=vit_embd)
    if image_size % patch_size or (image_size // patch_size) % llm_grid:
        raise InputError(f"image_size {image_size} / patch_size {patch_size} must be a multiple of llm_grid {llm_grid}")
    seq = 2 + llm_grid ** 2 + vp_grid ** 2 + max_caption_len + 4
    gpt_cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                        n_embd=n_embd, sequence_len=seq, image_token_id=IMG)
    student = SegVLM(vit_cfg, gpt_cfg, dec_dim, llm_grid)
    return nn.ModuleDict(dict(student=student, teacher=copy.deepcopy(student)))

# -----------------------------------------------------------------------------
# prompts, the two forward paths, losses


def context_rows(img, vp):
    """Rows for GPT.embed's scatter, in prompt order per sample: N image rows, then that sample's K rows."""
    return torch.cat([torch.cat([img[b], vp[b]]) for b in range(img.shape[0])])


def vp_batch(model, feats, img, cells):
    """Left-padded region-captioning prompts + their context rows, with the per-row count check."""
    vp = model.vp_rows(feats, cells)
    ks = [v.shape[0] for v in vp]
    ids, pad_mask = left_pad([seg_vp_prompt_ids(tok, img.shape[1], k) for k in ks], pad_id=PAD, device=img.device)
    seg_check_context_counts(ids, IMG, img.shape[1], ks)
    return ids, pad_mask, context_rows(img, vp)


def segment(model, feats, img, images, caption_ids):
    """Referring segmentation from token captions: [SEG] is the last column of every (left-padded) row."""
    ids, pad_mask = left_pad([seg_prompt_ids(tok, img.shape[1], c) for c in caption_ids], pad_id=PAD,
                             device=img.device)
    x = model.gpt.embed(ids, img.reshape(-1, img.shape[-1]))
    return segment_embeds(model, x, pad_mask, ids, feats, images)


def segment_embeds(model, x, pad_mask, ids, feats, images):
    """Mask logits from input embeddings whose last column is [SEG] in every row. A row without it is an
    error, never a zero loss (the journal's string-encoded [SEG] silently trained on nothing)."""
    n_seg = (ids == SEG).sum(1)
    if not bool((ids[:, -1] == SEG).all()) or not bool((n_seg == 1).all()):
        raise InputError(f"every segmentation row needs exactly one [SEG] (id {SEG}) at its end; "
                         f"counts {n_seg.tolist()}")
    h = model.gpt.forward_embeds(x, pad_mask)
    return model.decoder(h[:, -1], feats, images)


def mask_loss(logits, target):
    """Per-sample BCE + Dice over the samples that have a target; samples with an empty target are skipped
    (and counted by the caller). Returns (loss or None, n_skipped)."""
    keep = target.flatten(1).sum(1) > 0
    n_skip = int((~keep).sum())
    if not bool(keep.any()):
        return None, n_skip
    logits, target = logits[keep], target[keep]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return (bce + dice).mean(), n_skip


def right_pad(seqs, device):
    """Token lists -> (ids (B, L) padded with <|pad|>, valid (B, L)); L >= 1."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        valid[i, :len(s)] = True
    return ids.to(device), valid.to(device)


def st_topk_gumbel(logits, tau=0.7, top_k=0, noise=None):
    """Straight-through top-k Gumbel-softmax. Logits outside the top k are dropped, Gumbel noise added, and
    y_soft = softmax((logits + g) / tau). Returns y_hard - y_soft.detach() + y_soft: its value is the one-hot
    of the sample, its gradient is y_soft's (tests check both)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if noise is None:
        u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
        noise = -torch.log(-torch.log(u))
    y_soft = F.softmax((logits + noise) / tau, dim=-1)
    y_hard = F.one_hot(y_soft.argmax(-1), logits.shape[-1]).to(y_soft.dtype)
    return y_hard - y_soft.detach() + y_soft


def stage_a_loss(model, images, masks, caption_ids, cells):
    """Referring segmentation (BCE + Dice) + region captioning (teacher-forced cross-entropy). A batch with no
    non-empty mask gives loss None, a skipped step as in stage B: a caption-only step would leave the decoder
    without a gradient, which under DDP stalls the ranks that have one."""
    feats, img = model.encode(images)
    seg_loss, n_skip = mask_loss(segment(model, feats, img, images, caption_ids), masks)
    seg_tokens = len(caption_ids) * (img.shape[1] + 2 + max(len(c) for c in caption_ids))  # segment()'s prompt
    ids, pad_mask, rows = vp_batch(model, feats, img, cells)
    P = ids.shape[1]
    caps, cap_mask = right_pad([c + [EOS] for c in caption_ids], img.device)
    inputs = torch.cat([ids, caps[:, :-1]], 1)
    logits, _ = model.gpt(inputs, vision_embeds=rows, pad_mask=torch.cat([pad_mask, cap_mask[:, :-1]], 1))
    targets = caps.masked_fill(~cap_mask, -1)
    ce = F.cross_entropy(logits[:, P - 1:].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    loss = None if seg_loss is None else seg_loss + caption_weight * ce
    return loss, dict(seg=float(seg_loss.detach()) if seg_loss is not None else float("nan"), ce=float(ce.detach()),
                      skipped=n_skip, tokens=seg_tokens + inputs.numel())


@torch.no_grad()
def caption_regions(model, feats, img, cells, max_len):
    """Greedy region captions (KV cache) -> list of token lists (EOS and after removed)."""
    ids, pad_mask, rows = vp_batch(model, feats, img, cells)
    out = model.gpt.generate(ids, max_len + 1, vision_embeds=rows, pad_mask=pad_mask, eos_id=EOS,
                             suppress_ids=INPUT_ONLY)
    caps = []
    for row in out.tolist():
        caps.append(row[:row.index(EOS)] if EOS in row else row[:max_len])
    return caps


def stage_b_loss(model, teacher, images, masks, cells):
    """The six-step pseudo-Gumbel loop (DESIGN.md section 5). Returns (loss or None, stats, text_embeds)."""
    # (1) the EMA teacher captions each region greedily, without gradient
    with torch.no_grad():
        t_feats, t_img = teacher.encode(images)
        pseudo = caption_regions(teacher, t_feats, t_img, cells, max_caption_len)
    caps, valid = right_pad([p + [EOS] for p in pseudo], images.device)
    text_valid = valid & (caps != EOS)  # the caption's own tokens; EOS ends it
    # (2) random 25% masking of the pseudo tokens (the trainable model's input only)
    hide = (torch.rand(caps.shape, device=caps.device) < mask_ratio) & text_valid
    masked = caps.masked_fill(hide, MASK)
    # (3) the trainable model's logits for every caption position, from the region prompt
    feats, img = model.encode(images)
    ids, pad_mask, rows = vp_batch(model, feats, img, cells)
    P, L = ids.shape[1], caps.shape[1]
    x = model.gpt.embed(torch.cat([ids, masked[:, :-1]], 1), rows)
    h = model.gpt.forward_embeds(x, torch.cat([pad_mask, valid[:, :-1]], 1))
    logits = model.gpt.logits(h[:, P - 1:P - 1 + L])
    n_tokens = x.shape[0] * x.shape[1]  # the trainable GPT's positions (padding included: it is computed)
    # self-distillation anchor: without it the byte-level captions lose their spelling within ~100 steps
    # (measured: 'green circle' -> 'green cire', cycle IoU 0.87 -> 0.75); it uses no ground-truth caption
    distill = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), caps.masked_fill(~valid, -1).reshape(-1),
                              ignore_index=-1)
    special = torch.arange(logits.shape[-1], device=logits.device) >= tok.n_base
    logits = logits.masked_fill(special, float("-inf"))  # text positions carry text: no special is sampled
    # (4) straight-through top-k Gumbel-softmax -> one-hots whose backward is soft -> text embeddings
    y = st_topk_gumbel(logits, gumbel_tau, gumbel_top_k)
    text = y @ model.gpt.transformer.wte.weight
    text.retain_grad()
    # (5) [SEG] appended by id; the mask is predicted from these embeddings (padding columns are masked out)
    seg_ids = torch.tensor([BOS] + [IMG] * img.shape[1] + [PAD] * L + [SEG], device=images.device)
    seg_ids = seg_ids.expand(images.shape[0], -1)
    base = model.gpt.embed(seg_ids, img.reshape(-1, img.shape[-1]))
    n = 1 + img.shape[1]
    x = torch.cat([base[:, :n], text.to(base.dtype), base[:, n + L:]], 1)
    ones = torch.ones(images.shape[0], n, dtype=torch.bool, device=images.device)
    seg_mask = torch.cat([ones, text_valid, ones[:, :1]], 1)
    # (6) BCE + Dice against the region's mask
    seg, n_skip = mask_loss(segment_embeds(model, x, seg_mask, seg_ids, feats, images), masks)
    loss = seg + distill_weight * distill if seg is not None and distill_weight > 0 else seg
    # seg on its own: the mask loss is what stage B trains (the journal's was 0.0000 for a whole run, unnoticed)
    return loss, dict(skipped=n_skip, pseudo_len=float(text_valid.sum(1).float().mean()),
                      distill=float(distill.detach()), seg=float(seg.detach()) if seg is not None else float("nan"),
                      tokens=n_tokens + x.shape[0] * x.shape[1]), text


@torch.no_grad()
def ema_update(teacher, student, decay):
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - decay)

# -----------------------------------------------------------------------------
# eval: rollout metrics (thresholded masks, generated captions, and the cycle mask -> caption -> mask)


@torch.no_grad()
def evaluate(model, dev, ctx, vis_path=None):
    model.eval()
    I, U, cI, cU, gens, gts, vis = [], [], [], [], [], [], []
    for start in range(0, n_eval, eval_batch_size):
        b = get_batch("val", range(start, min(n_eval, start + eval_batch_size)), dev)
        with ctx:
            feats, img = model.encode(b["images"])
            pred = segment(model, feats, img, b["images"], b["caption_ids"]) > 0
            gen = caption_regions(model, feats, img, b["cells"], max_caption_len)
            cyc = segment(model, feats, img, b["images"], gen) > 0
        i, u = seg_iou_stats(pred.cpu(), b["masks"].cpu())
        ci, cu = seg_iou_stats(cyc.cpu(), b["masks"].cpu())
        I.append(i), U.append(u), cI.append(ci), cU.append(cu)
        gens += gen
        gts += b["caption_ids"]
        for j in range(min(n_vis - len(vis), len(gen))):
            vis.append(seg_panel(b["images"][j], b["masks"][j], pred[j], cyc[j], b["captions"][j], tok.decode(gen[j])))
    I, U, cI, cU = torch.cat(I), torch.cat(U), torch.cat(cI), torch.cat(cU)
    if vis_path and vis:
        save_png(seg_panels(vis), vis_path)
    model.train()
    return dict(giou=seg_giou(I, U), ciou=seg_ciou(I, U), caption_acc=seg_caption_token_accuracy(gens, gts),
                caption_exact=sum(g == t for g, t in zip(gens, gts)) / len(gts), cycle_iou=seg_giou(cI, cU))

# -----------------------------------------------------------------------------
# training


def check_config():
    """Settings that would fail deep inside training (or train on nothing) fail here, in one line."""
    if dataset not in ("synthetic", "refcoco"):
        raise InputError(f"dataset must be 'synthetic' or 'refcoco', got {dataset!r}")
    if not 0 < stage_a_steps <= max_steps:
        raise InputError(f"need 0 < stage_a_steps ({stage_a_steps}) <= max_steps ({max_steps})")
    for k in ("max_caption_len", "vp_grid", "grad_norm_interval"):  # (the shared counts: configurator.POSITIVE_KEYS)
        if globals()[k] < 1:
            raise InputError(f"{k} must be >= 1, got {globals()[k]}")
    if gumbel_tau <= 0:
        raise InputError(f"gumbel_tau (the Gumbel-softmax temperature) must be > 0, got {gumbel_tau}")
    if not 0 <= mask_ratio <= 1 or not 0 <= ema_decay <= 1:
        raise InputError(f"mask_ratio ({mask_ratio}) and ema_decay ({ema_decay}) must lie in [0, 1]")


def main():
    check_config()
    if dataset == "refcoco":
        records("train"), records("val")  # fail on a missing/bad JSON before anything is written
    ddp = init_distributed(device)
    dev, master = ddp["device"], ddp["master"]
    torch.manual_seed(seed + ddp["rank"])
    ctx, dtype_name = autocast_ctx(ddp["device_type"], dtype)
    run = run_dir(out_dir, RECIPE, init_from)
    meta = None
    if init_from == "scratch":
        bundle = build_model()
    else:
        src = os.path.join(run, "ckpt") if init_from == "resume" else resolve_checkpoint(init_from)
        meta = load_meta(src)
        if meta.get("recipe") != RECIPE:
            raise InputError(f"checkpoint {src} is a '{meta.get('recipe')}' checkpoint, not '{RECIPE}'")
        globals().update(adopt_checkpoint_config(meta, config, MODEL_KEYS, verbose=master))
        bundle = build_model(meta)
    bundle.to(dev)
    student, teacher = bundle["student"], bundle["teacher"]
    teacher.requires_grad_(False)
    teacher.eval()
    optimizer = configure_optimizers(student, lr, weight_decay, device_type=ddp["device_type"])
    step, stage_a, skipped, skipped_steps = 0, {}, 0, 0
    peak = measure_matmul_peak(dev) if master else None  # before set_rng_state: its randn draws from the RNG
    if meta is not None:
        load_checkpoint(src, bundle, optimizer if init_from == "resume" else None)
        if init_from == "resume" or eval_only:
            step, stage_a, skipped = meta["step"], meta.get("stage_a", {}), meta.get("skipped", 0)
            skipped_steps = meta.get("skipped_steps", 0)
        if init_from == "resume":
            set_rng_state(meta["rng"])
            print(f"resumed {src} at step {step}")
    model = student
    if ddp["ddp"]:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[ddp["local_rank"]] if dev != "cpu" else None)
    model = maybe_compile(model, compile, ddp["device_type"])
    n_params = sum(p.numel() for p in student.parameters())
    gpt_cfg = student.gpt.config
    # the MFU counts the GPT's FLOPs on its positions (the ViT and mask decoder are left out: a lower bound)
    gpt_flops = gpt_flops_per_token(gpt_cfg, student.gpt.num_params(exclude_embedding=True))
    if master:
        os.makedirs(run, exist_ok=True)
        print(f"run dir {run} | {n_params / 1e6:.2f}M params | device {dev} {dtype_name} | "
              f"stage A {stage_a_steps} steps, stage B {max_steps - stage_a_steps} steps")
    logger = WandbLogger(wandb_log and master, wandb_project, wandb_run_name, config, run)
    t_start = time.time()
    train_seconds = meta.get("train_seconds", 0.0) if (meta and init_from == "resume") else 0.0
    from dataclasses import asdict

    def checkpoint(rngs):
        save_checkpoint(os.path.join(run, "ckpt"), bundle, optimizer, meta=dict(
            recipe=RECIPE, step=step, config=config, rng=rngs, vit=asdict(student.vit.config),
            gpt=asdict(gpt_cfg), dec_dim=dec_dim, llm_grid=student.llm_grid, specials=list(SEG_SPECIALS),
            stage_a=stage_a, skipped=skipped, skipped_steps=skipped_steps,
            train_seconds=train_seconds + time.time() - t_start))  # a resume continues this clock

    def run_eval():
        metrics = evaluate(student, dev, ctx, os.path.join(run, f"samples_step{step:05d}.png"))
        if step >= stage_a_steps and not stage_a:  # the stage A reference stage B is judged against
            stage_a.update(giou=metrics["giou"], cycle_iou=metrics["cycle_iou"], ciou=metrics["ciou"],
                           caption_acc=metrics["caption_acc"])
        if stage_a and step > stage_a_steps:
            metrics.update(giou_stage_a=stage_a["giou"], cycle_iou_stage_a=stage_a["cycle_iou"],
                           giou_drop=stage_a["giou"] - metrics["giou"],
                           cycle_iou_gain=metrics["cycle_iou"] - stage_a["cycle_iou"])
        metrics["skipped"], metrics["skipped_steps"] = skipped, skipped_steps
        stage = "A" if step <= stage_a_steps else "B"
        print(f"eval step {step} (stage {stage}) | " + format_metrics(metrics, TARGETS))
        write_results(run, RECIPE, "val", n_eval, metrics, TARGETS, step=step, stage=stage, stage_a=stage_a,
                      train_seconds=round(train_seconds + time.time() - t_start, 1), device=dev, dtype=dtype_name,
                      params=n_params, config=config)
        logger.log(metrics, step, images={"samples": os.path.join(run, f"samples_step{step:05d}.png")})
        return metrics

    if eval_only:
        if master:
            run_eval()
        return
    t0, step0, n_tokens = time.time(), step, 0
    grads = None  # (step, text-emb, decoder, projector) gradient norms at their last measurement
    while step < max_steps:
        if step == stage_a_steps:  # stage B starts: the teacher is the stage A model
            teacher.load_state_dict(student.state_dict())
        in_b = step >= stage_a_steps
        lr_now = (get_lr(step - stage_a_steps, max_steps - stage_a_steps, lr_b, 0, min_lr_frac) if in_b
                  else get_lr(step, stage_a_steps, lr, warmup_steps, min_lr_frac))
        set_lr(optimizer, lr_now)
        b = get_batch("train", batch_indices(step, batch_size, ddp["rank"], ddp["world_size"]), dev,
                      "B" if in_b else "A")
        with ctx:
            if in_b:
                loss, stats, text = model("stage_b", teacher=teacher, images=b["images"], masks=b["masks"],
                                          cells=b["cells"])
            else:
                loss, stats = model("stage_a", images=b["images"], masks=b["masks"], caption_ids=b["caption_ids"],
                                    cells=b["cells"])
        skipped += stats["skipped"]
        n_tokens += stats["tokens"]
        # no sample with a non-empty mask: a counted skip, never a zero loss. Every rank skips together (a rank
        # that skipped alone would leave the others waiting for its gradients); eval, checkpoint, log still run
        skip = mean_across_ranks(float(loss is None), dev) > 0
        if skip:
            skipped_steps += 1
            if master:
                print(f"step {step + 1}: batch skipped (no sample with a non-empty mask on some rank); "
                      f"{skipped_steps} steps skipped so far")
        else:
            check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if in_b and (step - stage_a_steps) % grad_norm_interval == 0:
                if text.grad is None or float(text.grad.norm()) == 0.0:
                    raise RuntimeError(f"step {step}: no gradient reached the text embeddings (the Gumbel path is cut)")
                grads = (step + 1, float(text.grad.norm()), grad_norm(student.decoder), grad_norm(student.proj))
                logger.log(dict(text_emb_grad=grads[1], decoder_grad=grads[2], proj_grad=grads[3]), step + 1)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
            optimizer.step()
            if in_b:
                ema_update(teacher, student, ema_decay)
        step += 1
        if not skip and (step % log_interval == 0 or step == max_steps):
            loss_avg = mean_across_ranks(loss.item(), dev)  # the global batch's loss (every rank joins)
            dt, tokens = (time.time() - t0) / (step - step0), n_tokens / (step - step0)  # tokens: this rank's
            t0, step0, n_tokens = time.time(), step, 0                                     # GPT positions per step
            if master:
                extra = (f"stage B | seg {stats['seg']:.4f} | distill {stats['distill']:.3f} | "
                         f"pseudo len {stats['pseudo_len']:.1f}" if in_b
                         else f"stage A | seg {stats['seg']:.3f} | ce {stats['ce']:.3f}")
                if in_b and grads:  # measured every grad_norm_interval steps: printed with the step it is from
                    extra += (f" | text-emb grad {grads[1]:.3g} @ step {grads[0]} "
                              f"(decoder {grads[2]:.3g}, proj {grads[3]:.3g})")
                print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens,
                               gpt_flops * tokens, peak, extra=extra))
                logger.log(dict(loss=loss_avg, lr=lr_now, seg=stats["seg"]), step)
        if step % eval_interval == 0 or step == stage_a_steps or step == max_steps:
            # every rank's RNG (the Gumbel noise and masking differ by rank): gathered by all, saved by rank 0, so a
            # resume gives each rank its own stream back (evaluation draws no random numbers)
            rngs = all_rng_states()
            if master:
                run_eval()
                checkpoint(rngs)
    if master:
        print(f"done: {skipped_steps} steps skipped, {skipped} samples with an empty mask (rank 0's); "
              f"results in {os.path.join(run, 'results.json')}")
    if master and push_to_hub:
        push_run_to_hub(push_to_hub, run, RECIPE, config)
    logger.finish()
    model = unwrap(model)  # drop the DDP wrapper first: it holds the process group, which must not outlive teardown
    cleanup_distributed()


if __name__ == "__main__":
    main()
