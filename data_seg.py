"""
Seg-Gumbel data: synthetic referring-segmentation scenes, the prompt layouts ([SEG], <vp> ... </vp>), the
visual prompt (region mask pooled to a g x g grid), a RefCOCO-style JSON reader, mask/caption metrics and
the visualisation panel. Merged into data.py by the lead; every public name starts with `seg_`.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from data import load_image, read_json, sample_rng, to_pil
from model import InputError

# -----------------------------------------------------------------------------
# special tokens and prompt layouts (every special is inserted by id, never by string search)

SEG_SPECIALS = ("[SEG]", "<vp>", "</vp>", "<mask>")  # + data.Tokenizer's <|bos|> <|eos|> <|pad|> <|image|>


def seg_prompt_ids(tok, n_img, caption_ids):
    """Referring segmentation: <|bos|> <|image|>*n_img caption [SEG]. The [SEG] hidden state is the mask query."""
    return [tok["<|bos|>"]] + [tok["<|image|>"]] * n_img + list(caption_ids) + [tok["[SEG]"]]


def seg_vp_prompt_ids(tok, n_img, k):
    """Region captioning prompt: <|bos|> <|image|>*n_img <vp> <|image|>*k </vp>. k = 0 is legal (an empty
    region prompt); the prompt then carries exactly n_img image-context tokens (the journal's 257-vs-256 bug
    came from forcing k >= 1 in the prompt while the model built k = 0 embeddings)."""
    if k < 0:
        raise ValueError(f"visual prompt token count must be >= 0, got {k}")
    return [tok["<|bos|>"]] + [tok["<|image|>"]] * n_img + [tok["<vp>"]] + [tok["<|image|>"]] * k + [tok["</vp>"]]


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

# -----------------------------------------------------------------------------
# metrics (on rolled-out outputs: thresholded masks, generated captions)


def seg_iou_stats(pred, gt):
    """Binary masks (B, H, W) -> (intersection (B,), union (B,)) pixel counts as float64 tensors."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return inter, union


def seg_giou(inter, union):
    """gIoU: the mean of per-sample IoUs. A sample with an empty union (empty target, empty prediction)
    scores 1, as in the GRES no-target convention."""
    inter, union = torch.as_tensor(inter, dtype=torch.float64), torch.as_tensor(union, dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.mean())


def seg_ciou(inter, union):
    """cIoU: cumulative intersection over cumulative union (large objects weigh more)."""
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
