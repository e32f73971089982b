"""
Seg-Gumbel's own pieces, used by train_seg_gumbel.py and its tests: synthetic referring-segmentation scenes, the
prompt layouts ([SEG], <vp> ... </vp>), the visual prompt (region mask pooled to a g x g grid), a RefCOCO-style
JSON reader, batches, the model (ViT -> projector -> GPT + a SAM-style mask decoder), the stage A and stage B
(pseudo-Gumbel) losses, the rollout eval, mask/caption metrics and the visualisation panel.
Every public name starts with `seg_` (or `Seg`).
"""
import copy
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import dataclass_from_dict
from data import Tokenizer, epoch_order, load_image, normalize, read_json, sample_rng, save_png, to_pil
from model import GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, left_pad
from runtime import global_mean

# -----------------------------------------------------------------------------
# special tokens and prompt layouts (every special is inserted by id, never by string search)

SEG_SPECIALS = ("[SEG]", "<vp>", "</vp>", "<mask>")  # + data.Tokenizer's <|bos|> <|eos|> <|pad|> <|image|>
# appended to a loaded LLM's tokenizer (init_gpt), in this order; its own BOS (if any) starts the prompts
SEG_LLM_SPECIALS = ["<|eos|>", "<|pad|>", "<|image|>", *SEG_SPECIALS]
SEG_TOK = Tokenizer(specials=SEG_SPECIALS)
BOS, EOS, PAD, IMG = SEG_TOK["<|bos|>"], SEG_TOK["<|eos|>"], SEG_TOK["<|pad|>"], SEG_TOK["<|image|>"]
SEG, VP, VP_END, MASK = SEG_TOK["[SEG]"], SEG_TOK["<vp>"], SEG_TOK["</vp>"], SEG_TOK["<mask>"]


class SegVocab:
    """The ids a model's prompts are made of, from its tokenizer (data.Tokenizer, or a loaded LLM's with
    SEG_LLM_SPECIALS appended). bos is None where the tokenizer has none (the prompts then start with the image).
    banned: every special and every row past the tokenizer's ids (a loaded model may have spare rows): never a
    caption token. Immutable, so the EMA teacher (a deep copy) shares its student's."""

    def __init__(self, tok, vocab_size=None):
        self.tok, self.bos = tok, tok.bos
        self.eos, self.pad, self.image = tok["<|eos|>"], tok["<|pad|>"], tok["<|image|>"]
        self.seg, self.vp, self.vp_end, self.mask = (tok[t] for t in SEG_SPECIALS)
        self.banned = sorted(set(tok.special.values()) | set(range(tok.vocab_size, vocab_size or tok.vocab_size)))
        # never generated (the image token is banned by GPT.generate)
        self.input_only = [i for i in (self.bos, self.pad, self.seg, self.vp, self.vp_end, self.mask) if i is not None]

    def __deepcopy__(self, memo):
        return self


SEG_VOCAB = SegVocab(SEG_TOK)
INPUT_ONLY = SEG_VOCAB.input_only


def seg_prompt_ids(tok, n_img, caption_ids):
    """Referring segmentation: <|bos|> <|image|>*n_img caption [SEG]. The [SEG] hidden state is the mask query."""
    return [tok.bos] * (tok.bos is not None) + [tok["<|image|>"]] * n_img + list(caption_ids) + [tok["[SEG]"]]


def seg_vp_prompt_ids(tok, n_img, k):
    """Region captioning prompt: <|bos|> <|image|>*n_img <vp> <|image|>*k </vp>. k = 0 is legal (an empty
    region prompt); the prompt then carries exactly n_img image-context tokens (forcing k >= 1 here while the
    model builds k = 0 embeddings would leave one context token without an embedding)."""
    if k < 0:
        raise ValueError(f"visual prompt token count must be >= 0, got {k}")
    bos = [tok.bos] * (tok.bos is not None)
    return bos + [tok["<|image|>"]] * n_img + [tok["<vp>"]] + [tok["<|image|>"]] * k + [tok["</vp>"]]


def seg_region_cells(mask, g=16):
    """The visual prompt: region mask(s) (H, W) or (B, H, W) pooled to a g x g grid; a cell is in the prompt
    when more than half of it is covered. Returns bool (g*g,) or (B, g*g); K = its sum (may be 0)."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    single = m.dim() == 2
    m = m[None] if single else m
    cells = F.adaptive_avg_pool2d(m[:, None], g)[:, 0].flatten(1) > 0.5
    return cells[0] if single else cells


def seg_check_context_counts(ids, image_id, n_img, ks):
    """Each row must hold exactly n_img + K_b image-context tokens, one per embedding that will be scattered
    into it. Raises ValueError naming the row and both counts (checked per row, not only in total)."""
    counts = (torch.as_tensor(ids) == image_id).sum(-1).tolist()
    for b, (have, k) in enumerate(zip(counts, ks)):
        if have != n_img + int(k):
            raise ValueError(f"row {b}: the prompt has {have} image-context tokens but {n_img} image + {int(k)} "
                             f"visual-prompt embeddings = {n_img + int(k)} were built")
    return counts

# -----------------------------------------------------------------------------
# synthetic scenes: 2-5 shapes of several kinds, colours and sizes, some overlapping


SEG_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
               "yellow": (235, 220, 40), "white": (235, 235, 235), "purple": (170, 60, 210)}
SEG_KINDS = ("circle", "square", "triangle", "diamond")


def seg_shape_mask(kind, cx, cy, r, size):
    """Exact rasterisation at pixel centres of a shape with centre (cx, cy) and half-size r."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "triangle":  # apex up, base at cy + r/2
        h = 1.5 * r
        t = (dy + r) / h  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 0.95)
    raise ValueError(f"unknown shape kind {kind!r}")


def seg_synthetic_sample(seed, split, index, image_size=32, min_visible=0.5):
    """One scene, a pure function of (seed, split, index): dict(image (3, S, S) in [0, 1], mask (S, S) float
    {0, 1}: the target's visible pixels, caption 'red circle'). (colour, kind) pairs are unique in a scene,
    so the caption refers to exactly one shape; the target is at least `min_visible` unoccluded."""
    rng = sample_rng(seed, split, index)
    S = image_size
    n = int(rng.integers(2, 6))
    pairs = [(c, k) for c in SEG_COLOURS for k in SEG_KINDS]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    label = np.full((S, S), -1, dtype=np.int64)
    full = []
    for i in range(n):
        r = float(rng.uniform(0.14, 0.26)) * S  # sizes from small to large
        cx, cy = rng.uniform(r, S - r, size=2)
        m = seg_shape_mask(chosen[i][1], cx, cy, r, S)
        label[m] = i  # painter's order: later shapes occlude earlier ones
        full.append(m)
    visible = [(label == i) for i in range(n)]
    ok = [i for i in range(n) if visible[i].sum() >= 20 and visible[i].sum() >= min_visible * max(1, full[i].sum())]
    target = int(rng.choice(ok)) if ok else n - 1  # the last drawn is never occluded
    img = np.empty((S, S, 3), dtype=np.float32)
    img[:] = rng.uniform(0, 50, size=3)  # dark background, tint varies
    img += rng.normal(0, 6, size=(S, S, 3))
    for i in range(n):
        colour = np.array(SEG_COLOURS[chosen[i][0]], dtype=np.float32) + rng.normal(0, 10, size=3)
        img[visible[i]] = colour
    img = np.clip(img, 0, 255) / 255.0
    colour, kind = chosen[target]
    return dict(image=torch.from_numpy(img).permute(2, 0, 1).contiguous().float(),
                mask=torch.from_numpy(visible[target].astype(np.float32)), caption=f"{colour} {kind}")


def seg_collate(samples):
    """List of sample dicts -> dict(images (B, 3, S, S), masks (B, S, S), captions [str])."""
    return dict(images=torch.stack([s["image"] for s in samples]), masks=torch.stack([s["mask"] for s in samples]),
                captions=[s["caption"] for s in samples])

# -----------------------------------------------------------------------------
# RefCOCO-style JSON: image path, polygon (COCO list of [x1, y1, x2, y2, ...]) or binary-mask PNG, sentences


def seg_read_refcoco(json_path, image_root=None):
    """-> list of records dict(image, polygons | mask_path, caption), one per referring sentence.
    Accepts a list of annotations or {"annotations": [...]}; each annotation has "image" (or "file_name"),
    "segmentation" (COCO polygons) or "mask" (a PNG path), and "sentences" (a list of strings or {"sent": str},
    as the refer API writes them). Relative paths resolve against image_root (default: the JSON's folder).
    Anything else is an InputError naming the file and the annotation."""
    data = read_json(json_path, "RefCOCO JSON")
    if isinstance(data, dict):
        if "annotations" not in data:
            raise InputError(f"{json_path}: a JSON object needs an 'annotations' list (it has keys "
                             f"{sorted(data)[:8]}); or write the annotations list itself")
        data = data["annotations"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{json_path}: want a non-empty list of annotations, got "
                         f"{'an empty list' if data == [] else type(data).__name__}")
    root = image_root or os.path.dirname(os.path.abspath(json_path))
    records = []
    for i, ann in enumerate(data):
        where = f"{json_path}: annotation {i}"
        if not isinstance(ann, dict):
            raise InputError(f"{where} is a {type(ann).__name__}, not an object")
        image = ann.get("image", ann.get("file_name"))
        if not isinstance(image, str):
            raise InputError(f"{where} has no 'image' (or 'file_name') path")
        rec = dict(image=os.path.join(root, image))
        if "segmentation" in ann:
            seg = ann["segmentation"]
            if isinstance(seg, dict):
                raise InputError(f"{where} uses RLE segmentation; convert it to a mask PNG")
            polys = [seg] if seg and not isinstance(seg[0], (list, tuple)) else seg
            if not polys or any(len(p) < 6 or len(p) % 2 for p in polys):
                raise InputError(f"{where} has a polygon with fewer than 3 (x, y) points")
            rec["polygons"] = [[float(v) for v in p] for p in polys]
        elif "mask" in ann:
            if not isinstance(ann["mask"], str):
                raise InputError(f"{where}: 'mask' must be a PNG path, got {ann['mask']!r:.40}")
            rec["mask_path"] = os.path.join(root, ann["mask"])
        else:
            raise InputError(f"{where} has neither 'segmentation' nor 'mask'")
        sents = ann.get("sentences", [])
        if not isinstance(sents, list):  # a bare string would become one caption per character
            raise InputError(f"{where}: 'sentences' must be a list (of strings or {{'sent': str}}), got "
                             f"{type(sents).__name__} {sents!r:.40}")
        sentences = [s.get("sent") if isinstance(s, dict) else s for s in sents]
        if not sentences:
            raise InputError(f"{where} has no referring sentences")
        if not all(isinstance(s, str) and s.strip() for s in sentences):
            raise InputError(f"{where}: every sentence must be a non-empty string (or {{'sent': str}}), "
                             f"got {sents!r:.60}")
        records += [dict(rec, caption=s) for s in sentences]
    return records


def seg_load_record(rec, image_size):
    """A reader record -> the same sample dict as the synthetic generator (image and mask at image_size). A mask
    PNG's nonzero pixels are the region whatever their value (0/1 and 0/255 PNGs both occur); an all-zero one
    is an error naming the file. (A mask that vanishes at image_size is the training loop's counted skip.)"""
    from PIL import Image, ImageDraw
    if not os.path.exists(rec["image"]):
        raise FileNotFoundError(f"image not found: {rec['image']}")
    with Image.open(rec["image"]) as im:
        W, H = im.size
    if "polygons" in rec:
        canvas = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(canvas)
        for p in rec["polygons"]:
            draw.polygon(list(zip(p[0::2], p[1::2])), fill=255)
    else:
        if not os.path.exists(rec["mask_path"]):
            raise FileNotFoundError(f"mask PNG not found: {rec['mask_path']}")
        with Image.open(rec["mask_path"]) as m:
            canvas = m.convert("L")
        if canvas.size != (W, H):
            raise InputError(f"mask {rec['mask_path']} is {canvas.size} but its image is {(W, H)}")
        if canvas.getextrema()[1] == 0:
            raise InputError(f"mask {rec['mask_path']} is empty (no nonzero pixel)")
        canvas = canvas.point(lambda v: 255 if v else 0)
    canvas = canvas.resize((image_size, image_size), Image.BILINEAR)
    mask = torch.from_numpy((np.asarray(canvas, dtype=np.float32) >= 128).astype(np.float32))
    return dict(image=load_image(rec["image"], image_size), mask=mask, caption=rec["caption"])

class SegData:
    """A run's batches: synthetic scenes (a pure function of seed, split and index) or RefCOCO-style records
    (read once, on first use). captioned_pool > 0 (synthetic): stage A draws from only that many captioned
    training scenes, again and again, while stage B draws fresh scenes past them and uses their masks only."""

    def __init__(self, dataset="synthetic", seed=1337, image_size=32, max_caption_len=16, vp_grid=16,
                 captioned_pool=3000, train_json="", val_json="", image_root="", tok=SEG_TOK):
        if dataset not in ("synthetic", "refcoco"):
            raise InputError(f"dataset must be 'synthetic' or 'refcoco', got {dataset!r}")
        self.dataset, self.seed, self.image_size, self.max_caption_len = dataset, seed, image_size, max_caption_len
        self.vp_grid, self.captioned_pool, self.image_root = vp_grid, captioned_pool, image_root
        self.paths, self._records, self.tok = dict(train=train_json, val=val_json), {}, tok

    def records(self, split):
        if split not in self._records:
            if not self.paths[split]:
                raise InputError(f"dataset='refcoco' needs --{split}_json=")
            self._records[split] = seg_read_refcoco(self.paths[split], self.image_root or None)
        return self._records[split]

    def batch(self, split, indices, device, stage="A"):
        """-> dict(images, masks, captions [str], caption_ids [token lists, cut to max_caption_len], cells,
        index [the samples' indices])."""
        indices = list(indices)
        if self.dataset == "synthetic":
            pool, scenes = self.captioned_pool, indices
            if split == "train" and pool > 0:  # A: the captioned pool, again and again; B: scenes past it
                scenes = [i % pool if stage == "A" else pool + i for i in indices]
            samples = [seg_synthetic_sample(self.seed, split, i, self.image_size) for i in scenes]
        else:
            recs = self.records(split)
            if split == "train":  # a fresh permutation per epoch, the same on every rank
                picks = [epoch_order(len(recs), self.seed, i // len(recs))[i % len(recs)] for i in indices]
            else:
                picks = [i % len(recs) for i in indices]
            samples = [seg_load_record(recs[j], self.image_size) for j in picks]
        b = seg_collate(samples)
        return dict(images=b["images"].to(device), masks=b["masks"].to(device), captions=b["captions"],
                    caption_ids=[self.tok.encode(c)[:self.max_caption_len] for c in b["captions"]],
                    cells=seg_region_cells(b["masks"], self.vp_grid).to(device), index=indices)

# -----------------------------------------------------------------------------
# metrics (on rolled-out outputs: thresholded masks, generated captions)


def seg_iou_stats(pred, gt):
    """Binary masks (B, H, W), or one (H, W) mask scored as a batch of one -> (intersection (B,), union (B,))
    pixel counts as float64 tensors: LISA's intersectionAndUnionGPU foreground class (dvlab-research/LISA,
    utils/utils.py), as its validate() in train_ds.py calls it per mask."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    if pred.shape != gt.shape:
        raise InputError(f"mask shapes differ: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    if pred.dim() not in (2, 3):
        raise InputError(f"masks must be (H, W) or (B, H, W), got shape {tuple(pred.shape)}")
    if pred.dim() == 2:
        pred, gt = pred[None], gt[None]
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return inter, union


def seg_giou(inter, union):
    """gIoU: the mean of per-mask IoUs (LISA's giou, dvlab-research/LISA train_ds.py validate). A mask with an
    empty union (empty target, empty prediction) scores 1, LISA's no-object convention (from GRES).
    Deliberate difference: the exact ratio, without LISA's 1e-5 in the denominator."""
    inter, union = torch.as_tensor(inter, dtype=torch.float64), torch.as_tensor(union, dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.mean())


def seg_ciou(inter, union):
    """cIoU: cumulative intersection over cumulative union, large objects weighing more (LISA's ciou,
    dvlab-research/LISA train_ds.py validate). Deliberate differences: no 1e-10 in the denominator, and a set
    whose every union is empty scores 1 (LISA: 0), as gIoU does."""
    total = float(torch.as_tensor(union, dtype=torch.float64).sum())
    return float(torch.as_tensor(inter, dtype=torch.float64).sum()) / total if total > 0 else 1.0


def seg_caption_token_accuracy(preds, gts):
    """Rollout caption accuracy over token lists: matching positions / the longer length, summed over
    samples (a missing or extra token counts as wrong; EOS excluded by the caller)."""
    correct = total = 0
    for p, g in zip(preds, gts):
        correct += sum(int(a == b) for a, b in zip(p, g))
        total += max(len(p), len(g))
    return correct / total if total else 1.0

# -----------------------------------------------------------------------------
# visualisation: image | ground truth | prediction | cycle prediction, captions underneath


def seg_overlay(image, mask, colour=(255, 60, 60)):
    img = np.asarray(to_pil(image), dtype=np.float32)
    m = torch.as_tensor(mask).bool().numpy()[..., None]
    return np.where(m, 0.45 * img + 0.55 * np.array(colour, dtype=np.float32), 0.6 * img).astype(np.uint8)


def seg_panel(image, gt, pred, cycle_pred, caption, generated, scale=3):
    """One row: image, GT mask, mask from the GT caption, mask from the generated caption; text below."""
    from PIL import Image, ImageDraw
    tiles = [to_pil(image), to_pil(seg_overlay(image, gt, (60, 220, 60))), to_pil(seg_overlay(image, pred)),
             to_pil(seg_overlay(image, cycle_pred, (60, 140, 255)))]
    w, h = tiles[0].size
    w, h = w * scale, h * scale
    panel = Image.new("RGB", (4 * w, h + 24), "white")
    for i, t in enumerate(tiles):
        panel.paste(t.resize((w, h), Image.NEAREST), (i * w, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((2, h + 1), f"gt: {caption}"[:60], fill=(0, 0, 0))
    draw.text((2, h + 12), f"gen: {generated}"[:60], fill=(0, 0, 150))
    return panel


def seg_panels(rows):
    """Stack seg_panel images vertically."""
    from PIL import Image
    w, h = rows[0].size
    out = Image.new("RGB", (w, h * len(rows)), "white")
    for i, r in enumerate(rows):
        out.paste(r, (0, i * h))
    return out

# -----------------------------------------------------------------------------
# the model: ViT -> projector -> GPT, visual-prompt rows, SAM-style mask decoder


class SegMaskDecoder(nn.Module):
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
    def __init__(self, vit_cfg, gpt_cfg, dec_dim, llm_grid, vocab=SEG_VOCAB):
        super().__init__()
        self.llm_grid, self.vocab = llm_grid, vocab
        self.vit, self.gpt = ViT(vit_cfg), GPT(gpt_cfg)
        self.proj = Projector(vit_cfg.n_embd, gpt_cfg.n_embd)
        self.vp_type = nn.Parameter(torch.zeros(gpt_cfg.n_embd))  # marks a row as a region cell, not the image
        self.decoder = SegMaskDecoder(gpt_cfg.n_embd, vit_cfg.n_embd, dec_dim)

    def encode(self, images):
        """-> (ViT features (B, N, Cv) for the decoder and the visual prompt, image rows for the GPT
        (B, llm_grid**2, D)). The GPT gets a pooled view: the decoder localises from the full-resolution
        features, so the language model only needs to know what is in the picture (4x fewer tokens)."""
        c = self.vit.config
        feats = self.vit.encode(normalize(images, c.image_mean, c.image_std))["features"]
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
        return {"stage_a": seg_stage_a_loss, "stage_b": seg_stage_b_loss}[kind](self, **kw)


def seg_configs(image_size=32, patch_size=4, llm_grid=4, vp_grid=16, max_caption_len=16, vit_layers=2, vit_embd=128,
                vit_heads=4, n_layer=3, n_embd=128, n_head=4, n_kv_head=4):
    """-> (ViTConfig, GPTConfig) of a run from scratch; the GPT's sequence holds the longest prompt plus its
    caption."""
    if image_size % patch_size or (image_size // patch_size) % llm_grid:
        raise InputError(f"image_size {image_size} / patch_size {patch_size} must be a multiple of llm_grid {llm_grid}")
    vit_cfg = ViTConfig(image_size=image_size, patch_size=patch_size, n_layer=vit_layers, n_head=vit_heads,
                        n_embd=vit_embd)
    seq = 2 + llm_grid ** 2 + vp_grid ** 2 + max_caption_len + 4
    gpt_cfg = GPTConfig(vocab_size=SEG_TOK.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                        n_embd=n_embd, sequence_len=seq, image_token_id=IMG)
    return vit_cfg, gpt_cfg


def seg_configs_from_meta(meta):
    """-> (ViTConfig, GPTConfig) a checkpoint was built with (its meta.json)."""
    return dataclass_from_dict(ViTConfig, meta["vit"]), dataclass_from_dict(GPTConfig, meta["gpt"])


def seg_build_model(vit_cfg, gpt_cfg, dec_dim, llm_grid, fresh=True, vocab=SEG_VOCAB):
    """{student, teacher}: the teacher starts as a copy of the student (fresh=True) or is built on its own
    (fresh=False: a checkpoint's weights replace both). vocab: the SegVocab of the GPT's tokenizer."""
    student = SegVLM(vit_cfg, gpt_cfg, dec_dim, llm_grid, vocab)
    teacher = copy.deepcopy(student) if fresh else SegVLM(vit_cfg, gpt_cfg, dec_dim, llm_grid, vocab)
    return nn.ModuleDict(dict(student=student, teacher=teacher))

# -----------------------------------------------------------------------------
# prompts, the two forward paths, losses


def seg_context_rows(img, vp):
    """Rows for GPT.embed's scatter, in prompt order per sample: N image rows, then that sample's K rows."""
    return torch.cat([torch.cat([img[b], vp[b]]) for b in range(img.shape[0])])


def seg_vp_batch(model, feats, img, cells):
    """Left-padded region-captioning prompts + their context rows, with the per-row count check."""
    vp, v = model.vp_rows(feats, cells), model.vocab
    ks = [r.shape[0] for r in vp]
    ids, pad_mask = left_pad([seg_vp_prompt_ids(v.tok, img.shape[1], k) for k in ks], pad_id=v.pad, device=img.device)
    seg_check_context_counts(ids, v.image, img.shape[1], ks)
    return ids, pad_mask, seg_context_rows(img, vp)


def seg_segment(model, feats, img, images, caption_ids):
    """Referring segmentation from token captions: [SEG] is the last column of every (left-padded) row."""
    ids, pad_mask = left_pad([seg_prompt_ids(model.vocab.tok, img.shape[1], c) for c in caption_ids],
                             pad_id=model.vocab.pad, device=img.device)
    x = model.gpt.embed(ids, img.reshape(-1, img.shape[-1]))
    return seg_segment_embeds(model, x, pad_mask, ids, feats, images)


def seg_segment_embeds(model, x, pad_mask, ids, feats, images):
    """Mask logits from input embeddings whose last column is [SEG] in every row. A row without it is an
    error, never a zero loss (a [SEG] lost in encoding would otherwise train on nothing, silently)."""
    seg = model.vocab.seg
    n_seg = (ids == seg).sum(1)
    if not bool((ids[:, -1] == seg).all()) or not bool((n_seg == 1).all()):
        raise InputError(f"every segmentation row needs exactly one [SEG] (id {seg}) at its end; "
                         f"counts {n_seg.tolist()}")
    h = model.gpt.forward_embeds(x, pad_mask)
    return model.decoder(h[:, -1], feats, images)


def seg_mask_loss(logits, target, count=None):
    """Per-sample BCE + Dice over the samples that have a target; samples with an empty target are skipped
    (and counted by the caller). count: the step's number of samples with a target over all its micro-batches
    on this rank (global_mean adds the other ranks'); None: this batch's. Returns (loss or None, n_skipped): None
    only when count is None and no sample has a target (with a count, such a batch adds 0, its graph kept)."""
    keep = target.flatten(1).sum(1) > 0
    n_skip = int((~keep).sum())
    if count is None:
        if not bool(keep.any()):
            return None, n_skip
        count = keep.sum()
    logits, target = logits[keep], target[keep]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return global_mean((bce + dice).sum(), count, logits.device), n_skip


def seg_caption_loss(logits, targets, count=None):
    """Caption cross-entropy over the targets that are not -1, a mean over `count` of them (the step's, as
    seg_mask_loss's count; None: this batch's)."""
    count = (targets != -1).sum() if count is None else count
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1, reduction="sum")
    return global_mean(ce, count, logits.device)


def seg_step_counts(batches, stage):
    """The denominators of a step's means over its micro-batches on this rank: samples with a non-empty mask
    (seg) and caption targets (tokens: each caption, stage A's own or stage B's pseudo one, plus its EOS)."""
    captions = "caption_ids" if stage == "A" else "pseudo"
    return dict(seg=sum(int((b["masks"].flatten(1).sum(1) > 0).sum()) for b in batches),
                tokens=sum(len(c) + 1 for b in batches for c in b[captions]))


def seg_stage_b_noise(seed, indices, length, vocab, device):
    """Stage B's random draws for the training samples `indices`, each a pure function of (seed, its index): the
    masking uniforms (B, length) and Gumbel noise (B, length, vocab). k micro-batches or DDP ranks then draw what
    one batch of the same samples would."""
    hide, gumbel = [], []
    for i in indices:
        g = torch.Generator(device=device).manual_seed(int(np.random.default_rng([seed, 0x5E6, i]).integers(2 ** 62)))
        hide.append(torch.rand(length, generator=g, device=device))
        u = torch.rand(length, vocab, generator=g, device=device).clamp(1e-9, 1 - 1e-9)
        gumbel.append(-torch.log(-torch.log(u)))
    return dict(hide=torch.stack(hide), gumbel=torch.stack(gumbel))


def seg_right_pad(seqs, device, pad=PAD):
    """Token lists -> (ids (B, L) padded with pad, valid (B, L)); L >= 1."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        valid[i, :len(s)] = True
    return ids.to(device), valid.to(device)


def seg_st_topk_gumbel(logits, tau=0.7, top_k=0, noise=None):
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


def seg_stage_a_loss(model, images, masks, caption_ids, cells, caption_weight=1.0, counts=None):
    """Referring segmentation (BCE + Dice) + region captioning (teacher-forced cross-entropy). A batch with no
    non-empty mask gives loss None, a skipped step as in stage B: a caption-only step would leave the decoder
    without a gradient, which under DDP stalls the ranks that have one. counts: seg_step_counts of the step's
    micro-batches (None: this batch's own means)."""
    counts, v = counts or {}, model.vocab
    feats, img = model.encode(images)
    seg_loss, n_skip = seg_mask_loss(seg_segment(model, feats, img, images, caption_ids), masks, counts.get("seg"))
    seg_tokens = len(caption_ids) * (img.shape[1] + 2 + max(len(c) for c in caption_ids))  # seg_segment's prompt
    ids, pad_mask, rows = seg_vp_batch(model, feats, img, cells)
    P = ids.shape[1]
    caps, cap_mask = seg_right_pad([c + [v.eos] for c in caption_ids], img.device, v.pad)
    inputs = torch.cat([ids, caps[:, :-1]], 1)
    logits, _ = model.gpt(inputs, vision_embeds=rows, pad_mask=torch.cat([pad_mask, cap_mask[:, :-1]], 1))
    ce = seg_caption_loss(logits[:, P - 1:], caps.masked_fill(~cap_mask, -1), counts.get("tokens"))
    loss = None if seg_loss is None else seg_loss + caption_weight * ce
    return loss, dict(seg=float(seg_loss.detach()) if seg_loss is not None else float("nan"), ce=float(ce.detach()),
                      skipped=n_skip, tokens=seg_tokens + inputs.numel())


@torch.no_grad()
def seg_caption_regions(model, feats, img, cells, max_len):
    """Greedy region captions (KV cache) -> list of token lists (EOS and after removed)."""
    ids, pad_mask, rows = seg_vp_batch(model, feats, img, cells)
    eos = model.vocab.eos
    out = model.gpt.generate(ids, max_len + 1, vision_embeds=rows, pad_mask=pad_mask, eos_id=eos,
                             suppress_ids=model.vocab.input_only)
    caps = []
    for row in out.tolist():
        caps.append(row[:row.index(eos)] if eos in row else row[:max_len])
    return caps


@torch.no_grad()
def seg_teacher_captions(teacher, images, cells, max_len):
    """Stage B's step (1): the EMA teacher captions each region greedily, without gradient."""
    t_feats, t_img = teacher.encode(images)
    return seg_caption_regions(teacher, t_feats, t_img, cells, max_len)


def seg_stage_b_loss(model, images, masks, cells, teacher=None, max_len=16, mask_ratio=0.25, tau=0.7, top_k=16,
                     distill_weight=1.0, pseudo=None, noise=None, counts=None):
    """The six-step pseudo-Gumbel loop (notes/seg_gumbel.md). Returns (loss or None, stats, text_embeds).
    pseudo: the teacher's captions, made beforehand (seg_teacher_captions; None: made here); noise: the step's
    draws for these samples (seg_stage_b_noise; None: from the global RNG); counts: as seg_stage_a_loss's."""
    counts, v = counts or {}, model.vocab
    # (1) the EMA teacher captions each region greedily, without gradient
    pseudo = seg_teacher_captions(teacher, images, cells, max_len) if pseudo is None else pseudo
    caps, valid = seg_right_pad([p + [v.eos] for p in pseudo], images.device, v.pad)
    L = caps.shape[1]
    text_valid = valid & (caps != v.eos)  # the caption's own tokens; EOS ends it
    # (2) random masking (mask_ratio) of the pseudo tokens (the trainable model's input only)
    u = torch.rand(caps.shape, device=caps.device) if noise is None else noise["hide"][:, :L]
    hide = (u < mask_ratio) & text_valid
    masked = caps.masked_fill(hide, v.mask)
    # (3) the trainable model's logits for every caption position, from the region prompt
    feats, img = model.encode(images)
    ids, pad_mask, rows = seg_vp_batch(model, feats, img, cells)
    P = ids.shape[1]
    x = model.gpt.embed(torch.cat([ids, masked[:, :-1]], 1), rows)
    h = model.gpt.forward_embeds(x, torch.cat([pad_mask, valid[:, :-1]], 1))
    logits = model.gpt.logits(h[:, P - 1:P - 1 + L])
    n_tokens = x.shape[0] * x.shape[1]  # the trainable GPT's positions (padding included: it is computed)
    # self-distillation anchor: without it the byte-level captions lose their spelling within ~100 steps;
    # it uses no ground-truth caption
    distill = seg_caption_loss(logits, caps.masked_fill(~valid, -1), counts.get("tokens"))
    special = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    special[v.banned] = True
    logits = logits.masked_fill(special, float("-inf"))  # text positions carry text: no special is sampled
    # (4) straight-through top-k Gumbel-softmax -> one-hots whose backward is soft -> text embeddings
    y = seg_st_topk_gumbel(logits, tau, top_k, noise=None if noise is None else noise["gumbel"][:, :L])
    text = y @ model.gpt.transformer.wte.weight
    text.retain_grad()
    # (5) [SEG] appended by id; the mask is predicted from these embeddings (padding columns are masked out)
    prefix = [v.bos] * (v.bos is not None) + [v.image] * img.shape[1]
    seg_ids = torch.tensor(prefix + [v.pad] * L + [v.seg], device=images.device)
    seg_ids = seg_ids.expand(images.shape[0], -1)
    base = model.gpt.embed(seg_ids, img.reshape(-1, img.shape[-1]))
    n = len(prefix)
    x = torch.cat([base[:, :n], text.to(base.dtype), base[:, n + L:]], 1)
    ones = torch.ones(images.shape[0], n, dtype=torch.bool, device=images.device)
    seg_mask = torch.cat([ones, text_valid, ones[:, :1]], 1)
    # (6) BCE + Dice against the region's mask
    seg, n_skip = seg_mask_loss(seg_segment_embeds(model, x, seg_mask, seg_ids, feats, images), masks,
                                counts.get("seg"))
    loss = seg + distill_weight * distill if seg is not None and distill_weight > 0 else seg
    # seg reported on its own: the mask loss is what stage B trains, and must be seen to move
    return loss, dict(skipped=n_skip, pseudo_len=float(text_valid.sum(1).float().mean()),
                      distill=float(distill.detach()), seg=float(seg.detach()) if seg is not None else float("nan"),
                      tokens=n_tokens + x.shape[0] * x.shape[1]), text


@torch.no_grad()
def seg_ema_update(teacher, student, decay):
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - decay)

# -----------------------------------------------------------------------------
# eval: rollout metrics (thresholded masks, generated captions, and the cycle mask -> caption -> mask)


@torch.no_grad()
def seg_evaluate(model, data, n_eval, batch_size, device, ctx, n_vis=0, vis_path=None):
    """-> dict(giou, ciou, caption_acc, caption_exact, cycle_iou) on the first n_eval val samples; draws nothing
    random. vis_path: a PNG of the first n_vis samples (image | GT | mask from the caption | cycle mask)."""
    model.eval()
    I, U, cI, cU, gens, gts, vis = [], [], [], [], [], [], []
    for start in range(0, n_eval, batch_size):
        b = data.batch("val", range(start, min(n_eval, start + batch_size)), device)
        with ctx:
            feats, img = model.encode(b["images"])
            pred = seg_segment(model, feats, img, b["images"], b["caption_ids"]) > 0
            gen = seg_caption_regions(model, feats, img, b["cells"], data.max_caption_len)
            cyc = seg_segment(model, feats, img, b["images"], gen) > 0
        i, u = seg_iou_stats(pred.cpu(), b["masks"].cpu())
        ci, cu = seg_iou_stats(cyc.cpu(), b["masks"].cpu())
        I.append(i), U.append(u), cI.append(ci), cU.append(cu)
        gens += gen
        gts += b["caption_ids"]
        for j in range(min(n_vis - len(vis), len(gen))):
            vis.append(seg_panel(b["images"][j], b["masks"][j], pred[j], cyc[j], b["captions"][j],
                                 model.vocab.tok.decode(gen[j])))
    I, U, cI, cU = torch.cat(I), torch.cat(U), torch.cat(cI), torch.cat(cU)
    if vis_path and vis:
        save_png(seg_panels(vis), vis_path)
    model.train()
    return dict(giou=seg_giou(I, U), ciou=seg_ciou(I, U), caption_acc=seg_caption_token_accuracy(gens, gts),
                caption_exact=sum(g == t for g, t in zip(gens, gts)) / len(gts), cycle_iou=seg_giou(cI, cU))
