"""
Pointer recipe data: synthetic referring scenes, a PixMo-Points-like JSONL reader, coordinate-correct
augmentation, pixel-error / sequential metrics, the red-green-yellow drawing, and what train_pointer.py builds on
them: the config checks, the model's input channels, samples -> batches (PointerData) and the rolled-out
answers of an eval (the shared data code is in data.py; what only this recipe uses lives here).

Coordinates everywhere are normalised to [-1, 1] with -1 the left/top image EDGE and +1 the right/bottom
edge (pixel i covers [i, i+1), so its centre is (i + 0.5) / W * 2 - 1; torch's align_corners=False).
Pixel errors are measured in the image's own pixels (mean_px, ...; a synthetic scene is drawn at 384 x 384),
and beside them in a "frame" 384 tall and 384*W/H wide (mean_px384, ...), the resolution-normalised figure
(0.1 in normalised units is 19.2 px vertically there); the two agree on synthetic scenes.
"""
import itertools
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image, ImageDraw

from data import (Tokenizer, batch_indices, epoch_order, image_grid, load_image, normalize, oriented_edges, sample_rng,
                  save_png, step_batches, to_pil)
from model import InputError, KVCache, left_pad

POINTER_FRAME = 384
POINTER_COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
                   "magenta": (220, 60, 220), "cyan": (40, 220, 230)}
POINTER_SHAPES = ("circle", "square", "triangle", "diamond")
POINTER_SIZES = {"small": (12, 17), "large": (24, 32)}  # half-extent range in 384-frame px
POINTER_RELATIONS = ("left of", "right of", "above", "below")
POINTER_KINDS = ("attr", "size", "single_attr", "relation", "multi")
POINTER_WORDS = (tuple(POINTER_COLOURS) + POINTER_SHAPES + tuple(POINTER_SIZES)
                 + ("the", "every", "object", "left", "right", "of", "above", "below"))

# -----------------------------------------------------------------------------
# synthetic scenes


def pointer_matches(query, objects):
    """Indices of the objects a structured query refers to (the ground truth is defined by this function)."""
    def has(o, colour=None, shape=None, size=None):
        return ((colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)
                and (size is None or o["size"] == size))
    if query["kind"] != "relation":
        return [i for i, o in enumerate(objects) if has(o, query.get("colour"), query.get("shape"), query.get("size"))]
    ref = objects[query["ref"]]
    rel = {"left of": lambda o: o["x"] < ref["x"], "right of": lambda o: o["x"] > ref["x"],
           "above": lambda o: o["y"] < ref["y"], "below": lambda o: o["y"] > ref["y"]}[query["relation"]]
    return [i for i, o in enumerate(objects) if i != query["ref"] and has(o, query["colour"]) and rel(o)]


def pointer_candidates(query, objects):
    """The objects a relation query's own words select, before the relation: every object of the named colour but
    the reference. The target is the extreme one of them in the named direction (the only one on that side)."""
    return [i for i, o in enumerate(objects) if i != query["ref"] and o["colour"] == query["colour"]]


def pointer_query_text(q, objects):
    if q["kind"] == "relation":
        ref = objects[q["ref"]]
        return f"the {q['colour']} object {q['relation']} the {ref['colour']} {ref['shape']}"
    words = [w for w in (q.get("size"), q.get("colour"), q.get("shape")) if w]
    noun = "" if q.get("shape") else " object"
    return ("every " if q["kind"] == "multi" else "the ") + " ".join(words) + noun


def _place(rng, objects, half, frame, overlap, cluster=0.0):
    """A centre (integer px in the frame) inside the frame. Objects may overlap partially, but no centre
    lies inside another object's box (so every target centre stays visible). With probability `cluster`
    the centre is drawn next to an earlier object (boxes touching or overlapping): crowded scenes."""
    lo, hi = half + 2, frame - half - 2
    for _ in range(100):
        if cluster > 0 and objects and rng.random() < cluster:  # cluster=0 draws exactly as before
            o = objects[int(rng.integers(len(objects)))]
            reach = half + o["half"] + 4
            x, y = (int(np.clip(c + rng.integers(-reach, reach + 1), lo, hi - 1)) for c in (o["x"], o["y"]))
        else:
            x, y = (int(v) for v in rng.integers(lo, hi, size=2))
        if all(max(abs(x - o["x"]), abs(y - o["y"])) >= max(half, o["half"]) + 3
               and math.hypot(x - o["x"], y - o["y"]) >= overlap * (half + o["half"]) for o in objects):
            return x, y
    return None


def _pick(rng, options):
    """options[uniform index]: the same draw as rng.choice(options), 5x cheaper (scenes are built per step)."""
    return str(options[int(rng.integers(len(options)))])


def _random_object(rng, colours, shapes):
    size = _pick(rng, list(POINTER_SIZES))
    lo, hi = POINTER_SIZES[size]
    return dict(colour=_pick(rng, colours), shape=_pick(rng, shapes), size=size,
                half=int(rng.integers(lo, hi + 1)))


POINTER_KIND_WEIGHTS = {"attr": 0.3, "size": 0.15, "single_attr": 0.1, "relation": 0.2, "multi": 0.25}


def pointer_scene(rng, kind=None, frame=POINTER_FRAME, min_objects=3, max_objects=6, max_points=3, overlap=0.6,
                  kinds=POINTER_KINDS, cluster=0.0, weights=POINTER_KIND_WEIGHTS):
    """One scene and one query. Distractors share the target's colour or shape (each scene draws from a
    small palette), some objects overlap partially. Returns dict(objects, query, text, points (K, 2) in
    frame px, halves, kind, cand_points / cand_halves: the candidates the query's words select, for relation
    queries every object of the named colour but the reference, else the targets). Rejection-sampled until the
    query refers to exactly the intended targets.
    kind=None draws one of `kinds` with `weights` (renormalised over `kinds`)."""
    if kind is None:
        w = np.array([weights[k] for k in kinds])
        kind = str(rng.choice(list(kinds), p=w / w.sum()))
    for _ in range(200):
        colours = list(rng.choice(list(POINTER_COLOURS), size=int(rng.integers(2, 4)), replace=False))
        shapes = list(rng.choice(POINTER_SHAPES, size=int(rng.integers(2, 4)), replace=False))
        n = int(rng.integers(min_objects, max_objects + 1))
        protos = [_random_object(rng, colours, shapes) for _ in range(n)]
        if kind == "size":  # a same colour+shape twin of the other size
            twin = dict(protos[0], size="large" if protos[0]["size"] == "small" else "small")
            twin["half"] = int(rng.integers(*POINTER_SIZES[twin["size"]]))
            protos[1] = twin
        if kind == "multi":  # 1..max_points copies of one colour+shape
            k = int(rng.integers(1, max_points + 1))
            for j in range(1, min(k, n)):
                protos[j] = dict(_random_object(rng, colours, shapes), colour=protos[0]["colour"], shape=protos[0]["shape"])
        objects = []
        for p in protos:
            xy = _place(rng, objects, p["half"], frame, overlap, cluster)
            if xy is not None:
                objects.append(dict(p, x=xy[0], y=xy[1]))
        query = _pointer_query(rng, kind, objects, max_points)
        if query is not None:
            targets = pointer_matches(query, objects)
            if kind == "multi":  # reading order of a sequence: left to right, then top to bottom
                targets = sorted(targets, key=lambda i: (objects[i]["x"], objects[i]["y"]))
            points, halves = _centres_and_halves(objects, targets)
            cand_points, cand_halves = _centres_and_halves(
                objects, pointer_candidates(query, objects) if kind == "relation" else targets)
            return dict(objects=objects, query=query, text=pointer_query_text(query, objects), points=points,
                        halves=halves, kind=kind, cand_points=cand_points, cand_halves=cand_halves)
    raise RuntimeError(f"could not build a '{kind}' scene")  # not reached with these settings


def _centres_and_halves(objects, idx):
    """The objects' centres (pixel centres of their integer positions, frame px) and half-extents."""
    return (np.array([[objects[i]["x"] + 0.5, objects[i]["y"] + 0.5] for i in idx], dtype=np.float32),
            np.array([objects[i]["half"] for i in idx], dtype=np.float32))


def _pointer_query(rng, kind, objects, max_points):
    if not objects:
        return None
    t = objects[0]
    if kind == "multi":
        q = dict(kind=kind, colour=t["colour"], shape=t["shape"])
        return q if 1 <= len(pointer_matches(q, objects)) <= max_points else None
    if kind == "relation":
        for i, r in itertools.product(rng.permutation(len(objects)), rng.permutation(len(objects))):
            if i == r or len(pointer_matches(dict(kind="attr", colour=objects[r]["colour"], shape=objects[r]["shape"]), objects)) != 1:
                continue
            for rel in rng.permutation(POINTER_RELATIONS):
                q = dict(kind=kind, colour=objects[i]["colour"], relation=str(rel), ref=int(r))
                # unambiguous by a margin: no same-colour object within 8 px of the reference's line
                axis = "x" if rel in ("left of", "right of") else "y"
                near = any(abs(o[axis] - objects[r][axis]) < 8 for j, o in enumerate(objects)
                           if j != r and o["colour"] == objects[i]["colour"])
                if pointer_matches(q, objects) == [int(i)] and not near:
                    return q
        return None
    options = {"attr": [("colour", "shape")], "size": [("size", "colour", "shape")],
               "single_attr": [("shape",), ("colour",)]}[kind]
    for keys in options:
        q = dict(kind=kind, **{k: t[k] for k in keys})
        if pointer_matches(q, objects) == [0]:
            return q
    return None


def pointer_render(objects, size, frame=POINTER_FRAME, background=(24, 24, 28)):
    """Draw at the frame's resolution (integer centres, symmetric shapes: the centre is exact), then
    box-filter down to `size` px, so sub-pixel positions survive as antialiased edges. -> (3, size, size)."""
    img = Image.new("RGB", (frame, frame), background)
    d = ImageDraw.Draw(img)
    for o in objects:
        x, y, h, c = o["x"], o["y"], o["half"], POINTER_COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse([x - h, y - h, x + h, y + h], fill=c)
        elif o["shape"] == "square":
            d.rectangle([x - h, y - h, x + h, y + h], fill=c)
        elif o["shape"] == "triangle":  # bounding box centred on (x, y), like every shape
            d.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=c)
        else:
            d.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=c)
    if size != frame:
        img = img.resize((size, size), Image.BOX)
    # transpose in numpy: torch's strided copy of a small HWC image costs milliseconds on a busy CPU
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1)) / 255.0)


def pointer_normalize(points_px, frame_wh):
    """Frame pixel coordinates (K, 2) -> [-1, 1]."""
    wh = np.asarray(frame_wh, dtype=np.float32)
    return np.asarray(points_px, dtype=np.float32).reshape(-1, 2) / wh * 2 - 1


def pointer_denormalize(points, frame_wh):
    wh = np.asarray(frame_wh, dtype=np.float32)
    return (np.asarray(points, dtype=np.float32).reshape(-1, 2) + 1) / 2 * wh


def pointer_synthetic_sample(seed, split, index, img_size, kind=None, max_points=3, kinds=POINTER_KINDS, cluster=0.0,
                             weights=POINTER_KIND_WEIGHTS):
    """A pure function of (seed, split, index): dict(image (3, S, S), text, points (K, 2) in [-1, 1], image_wh
    (the scene's own pixels, 384 x 384), frame, kind, halves, objects, cand_points / cand_halves (see
    pointer_scene), all coordinates in [-1, 1] units)."""
    rng = sample_rng(seed, split, index)
    s = pointer_scene(rng, kind=kind, max_points=max_points, kinds=kinds, cluster=cluster, weights=weights)
    return dict(image=pointer_render(s["objects"], img_size), text=s["text"], kind=s["kind"],
                points=pointer_normalize(s["points"], (POINTER_FRAME, POINTER_FRAME)),
                halves=s["halves"] / (POINTER_FRAME / 2), image_wh=(POINTER_FRAME, POINTER_FRAME),
                frame=(POINTER_FRAME, POINTER_FRAME), objects=s["objects"],
                cand_points=pointer_normalize(s["cand_points"], (POINTER_FRAME, POINTER_FRAME)),
                cand_halves=s["cand_halves"] / (POINTER_FRAME / 2))

def pointer_word_specials():
    """Special-token names for the synthetic grammar's closed vocabulary (one token per word)."""
    return [f"<w:{w}>" for w in POINTER_WORDS]


def pointer_specials(word_tokens=True):
    """The special tokens the recipe appends to its tokenizer (a loaded LLM's too, after its own), in id order."""
    return ["<|point|>"] + (pointer_word_specials() if word_tokens else [])


def pointer_encode(tok, text, word_tokens=True):
    """Query -> token ids. word_tokens: each known word of the synthetic grammar is one token (added as
    specials, looked up by id), any other word falls back to bytes; otherwise plain byte tokens."""
    if not word_tokens:
        return tok.encode(text)
    ids = []
    for i, w in enumerate(text.split(" ")):
        name = f"<w:{w.lower()}>"
        ids += [tok[name]] if name in tok.special else tok.encode(("" if i == 0 else " ") + w)
    return ids

# -----------------------------------------------------------------------------
# real data: JSONL {"image": path, "query": str, "points": [[x, y], ...] in image pixels}


def pointer_read_jsonl(path):
    """-> list of records (image path resolved relative to the JSONL file). Pixel points are converted
    with each image's own size when the sample is loaded (images are not square). Checked here, so a bad
    record stops the run before training rather than when it is first sampled: the fields, finite points,
    and that the image file exists."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    root, records, seen = os.path.dirname(os.path.abspath(path)), [], set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                pts = [[float(x), float(y)] for x, y in r["points"]]
                rec = dict(image=os.path.join(root, r["image"]), text=str(r["query"]), points_px=pts)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InputError(f"{path}:{n}: bad record ({type(e).__name__}: {e}); expected "
                                 '{"image": str, "query": str, "points": [[x, y], ...]}') from None
            if not all(math.isfinite(v) for p in pts for v in p):  # JSON allows NaN / Infinity
                raise InputError(f"{path}:{n}: a point is not a finite number: {pts}")
            if rec["image"] not in seen:
                if not os.path.isfile(rec["image"]):
                    raise InputError(f"{path}:{n}: image not found: {rec['image']}")
                seen.add(rec["image"])
            records.append(rec)
    if not records:
        raise InputError(f"{path} holds no records")
    return records


def pointer_load_record(rec, img_size):
    """Record -> sample dict like the synthetic one. Points outside the image, and an image that cannot be
    read, raise InputError (naming the file)."""
    try:
        with Image.open(rec["image"]) as im:
            w, h = im.size
        image = load_image(rec["image"], img_size)  # decodes the pixels: a truncated file fails here
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors (UnidentifiedImageError is an OSError)
        raise InputError(f"{rec['image']}: cannot read the image ({type(e).__name__}: {e})") from None
    pts = np.asarray(rec["points_px"], dtype=np.float32).reshape(-1, 2)
    if len(pts) and ((pts < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any()):
        raise InputError(f"{rec['image']}: a point lies outside the {w}x{h} image: {pts.tolist()}")
    order = np.lexsort((pts[:, 1], pts[:, 0])) if len(pts) else []
    frame = (round(POINTER_FRAME * w / h), POINTER_FRAME)
    return dict(image=image, text=rec["text"], kind="multi" if len(pts) > 1 else "attr",
                points=pointer_normalize(pts[order], (w, h)), halves=np.zeros(len(pts), np.float32), image_wh=(w, h),
                frame=frame, objects=None)

# -----------------------------------------------------------------------------
# augmentation: one affine map applied to the image and to the points


def pointer_augment(image, points, text, rng, max_shift=0.1, scale_range=(0.9, 1.1), flip_prob=0.5):
    """Random scale s, translation t and horizontal flip f: a point p (normalised) moves to
    p' = s * (f * p) + t; the image is resampled with the inverse map (grid_sample, align_corners=False,
    the same [-1, 1] convention as the points). A flip swaps 'left'/'right' in the query and re-sorts the
    points left to right. If a point would leave the image, the sample is returned unchanged."""
    s = float(rng.uniform(*scale_range))
    t = rng.uniform(-max_shift, max_shift, size=2).astype(np.float32)
    flip = bool(rng.random() < flip_prob)
    f = np.array([-1.0 if flip else 1.0, 1.0], dtype=np.float32)
    new = (s * (f * points) + t).astype(np.float32)
    if len(new) and (np.abs(new) > 0.98).any():
        return image, points, text, 1.0
    # output pixel at q samples input at p = f * (q - t) / s  (f is its own inverse)
    theta = torch.tensor([[f[0] / s, 0.0, -f[0] * t[0] / s], [0.0, 1.0 / s, -t[1] / s]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if flip:
        # whole words only: "bright" stays "bright"
        text = re.sub(r"\b(left|right)\b", lambda w: "right" if w.group(1) == "left" else "left", text)
        new = new[np.lexsort((new[:, 1], new[:, 0]))] if len(new) else new
    return out, new, text, s


def pointer_patch_mask(points, halves, grid):
    """(grid*grid,) float mask of the patches whose centre lies inside a target's box (half-extent `halves`,
    normalised; at least half a patch, so every target marks its own patch): the dense grounding label."""
    c = (np.arange(grid, dtype=np.float32) + 0.5) / grid * 2 - 1
    xs, ys = np.meshgrid(c, c)  # raster order, like the ViT's patch tokens
    mask = np.zeros((grid, grid), dtype=bool)
    for (x, y), h in zip(np.asarray(points).reshape(-1, 2), np.asarray(halves).reshape(-1)):
        r = max(float(h), 1.0 / grid)
        mask |= (np.abs(xs - x) <= r) & (np.abs(ys - y) <= r)
    return mask.reshape(-1).astype(np.float32)

POINTER_N_COLOUR, POINTER_N_SHAPE, POINTER_N_SIZE = len(POINTER_COLOURS) + 1, len(POINTER_SHAPES) + 1, len(POINTER_SIZES) + 1


def pointer_parse_weights(dense, object_weight):
    """Per-patch weights of the dense parsing loss: a patch an object covers weighs object_weight background
    patches (most patches are background, learned in a few steps, which would otherwise drown the slow part:
    telling a circle from a square); patches without a label (-1) weigh 0."""
    colour = dense[..., 2].long()
    return (1.0 + (object_weight - 1.0) * (colour != POINTER_N_COLOUR - 1).float()) * (colour >= 0).float()


def pointer_dense_labels(objects, grid, frame=POINTER_FRAME):
    """Dense per-patch scene labels (raster order, like the ViT's patch tokens), for EVERY object, whatever
    the query: -> (grid*grid, 5) float32 [offset_x, offset_y, colour, shape, size]. A patch belongs to the
    object whose box (grown to at least half a patch, so small objects own the patch holding their centre)
    contains the patch centre, the nearest centre winning; offset = object centre - patch centre in patch
    widths; class ids index POINTER_COLOURS / POINTER_SHAPES / POINTER_SIZES, the last id is background
    (offset NaN = no offset target). objects=None (real data, augmented scenes): every label ignored (-1)."""
    n = grid * grid
    if objects is None:
        return np.concatenate([np.full((n, 2), np.nan, np.float32), np.full((n, 3), -1, np.float32)], 1)
    cell = frame / grid
    c = (np.arange(grid, dtype=np.float32) + 0.5) * cell
    px, py = (v.reshape(-1) for v in np.meshgrid(c, c))
    out = np.concatenate([np.full((n, 2), np.nan, np.float32),
                          np.tile(np.array([[POINTER_N_COLOUR - 1, POINTER_N_SHAPE - 1, POINTER_N_SIZE - 1]], np.float32), (n, 1))], 1)
    best = np.full(n, np.inf)
    colours, sizes = list(POINTER_COLOURS), list(POINTER_SIZES)
    for o in objects:
        cx, cy, r = o["x"] + 0.5, o["y"] + 0.5, max(o["half"], cell / 2)
        dist = np.hypot(px - cx, py - cy)
        own = (np.abs(px - cx) <= r) & (np.abs(py - cy) <= r) & (dist < best)
        best[own] = dist[own]
        out[own, 0], out[own, 1] = (cx - px[own]) / cell, (cy - py[own]) / cell
        out[own, 2:] = colours.index(o["colour"]), POINTER_SHAPES.index(o["shape"]), sizes.index(o["size"])
    return out


def pointer_window_softmax(logits, grid, window):
    """Softmax over a grid's patches (raster order, last dim) restricted to the (2w+1)^2 patches around the
    best one (w = window; -1 = all patches). A global soft-argmax lets 2% of the weight on a patch 150 px
    away move the answer by 3 px; the window keeps the answer on the chosen object."""
    if window < 0:
        return logits.softmax(-1)
    n = torch.arange(logits.shape[-1], device=logits.device)
    best = logits.argmax(-1, keepdim=True)
    near = ((n // grid - best // grid).abs() <= window) & ((n % grid - best % grid).abs() <= window)
    return logits.masked_fill(~near, float("-inf")).softmax(-1)


def pointer_curriculum_kinds(step, curriculum_steps):
    """The query kinds a training sample may draw at `step`: first the attribute-only kinds (what to look
    for: colour, shape, size words), then every kind (relations, "every ..."). 0 = no curriculum."""
    if curriculum_steps > 0 and step < curriculum_steps:
        return ("attr", "size", "single_attr")
    return POINTER_KINDS

# -----------------------------------------------------------------------------
# coordinate losses on the L1 distance d = |dx| + |dy| in [-1, 1] units (0.05 = 9.6 px, 0.1 = 19.2 px at 384 px)


def pointer_loss_three_stage(pred, gt):
    """The three-stage loss: 10 d^2 (d < 0.05), d^2 (0.05 <= d < 0.1), 0.2 d + 0.01 (d >= 0.1).
    Discontinuous (0.025 just below 0.05 vs 0.0025 just above; 0.01 vs 0.03 at 0.1), so NOT monotonic
    in the error: never early-stop or select on it; pixel errors are the measure."""
    d = (pred - gt).abs().sum(-1)
    return torch.where(d < 0.05, 10.0 * d ** 2, torch.where(d < 0.1, d ** 2, 0.2 * d + 0.01)).mean()


def pointer_loss_three_stage_cont(pred, gt):
    """The same three pieces with the same gradients (20 d, 2 d, 0.2), shifted by constants so the loss is
    continuous and monotonic: 10 d^2; d^2 + 0.0225; 0.2 d + 0.0125."""
    d = (pred - gt).abs().sum(-1)
    return torch.where(d < 0.05, 10.0 * d ** 2, torch.where(d < 0.1, d ** 2 + 0.0225, 0.2 * d + 0.0125)).mean()


def pointer_loss_l1(pred, gt):
    return (pred - gt).abs().sum(-1).mean()


def pointer_loss_smooth_l1(pred, gt, beta=0.02):
    """Huber per axis (quadratic below beta = 0.02 = 3.84 px), summed over the two axes."""
    return F.smooth_l1_loss(pred, gt, beta=beta, reduction="none").sum(-1).mean()


POINTER_LOSSES = dict(three_stage=pointer_loss_three_stage, three_stage_cont=pointer_loss_three_stage_cont,
                      l1=pointer_loss_l1, smooth_l1=pointer_loss_smooth_l1)

# -----------------------------------------------------------------------------
# metrics


def pointer_pixel_errors(pred, gt, wh):
    """Euclidean errors in the pixels of `wh`: (W, H) or (N, 2), an image's own size or its 384 frame.
    pred, gt: (N, 2) normalised. No public scorer exists for this recipe: the figures are the Pointer journal's
    (DESIGN.md, Pointer), defined here."""
    wh = np.broadcast_to(np.asarray(wh, dtype=np.float64), np.shape(gt))
    d = (np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64)) * wh / 2
    return np.sqrt((d ** 2).sum(-1))


def pointer_pixel_figures(pred, gt, wh, thresholds, suffix=""):
    """mean/median/p95 pixel error, the share within each threshold, per-axis mean absolute error, in the pixels
    of `wh`, each name ending in `suffix`."""
    err = pointer_pixel_errors(pred, gt, wh)
    wh = np.broadcast_to(np.asarray(wh, dtype=np.float64), gt.shape)
    m = dict(mean_px=float(err.mean()), median_px=float(np.median(err)), p95_px=float(np.percentile(err, 95)))
    for t in thresholds:
        m[f"within_{t}px"] = float((err <= t).mean())
    m["mae_x_px"] = float((np.abs(pred[:, 0] - gt[:, 0]) * wh[:, 0] / 2).mean())
    m["mae_y_px"] = float((np.abs(pred[:, 1] - gt[:, 1]) * wh[:, 1] / 2).mean())
    return {k + suffix: v for k, v in m.items()}


def pointer_pixel_metrics(pred, gt, image_wh, frame_wh=None, thresholds=(2, 5, 10, 15)):
    """Pixel figures (pointer_pixel_figures) in each image's own pixels (image_wh: (W, H) or (N, 2)): mean_px,
    median_px, p95_px, within_<t>px, mae_x_px, mae_y_px; with frame_wh (the 384-tall frames) the same figures
    in that frame beside, named with a 384 suffix (mean_px384, within_5px384, ...); per-axis MSE in normalised
    units (loss_x / loss_y). Source: the Pointer journal's figures (no public scorer), defined here."""
    pred, gt = np.asarray(pred, dtype=np.float64).reshape(-1, 2), np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    m = pointer_pixel_figures(pred, gt, image_wh, thresholds)
    if frame_wh is not None:
        m.update(pointer_pixel_figures(pred, gt, frame_wh, thresholds, suffix=str(POINTER_FRAME)))
    m["loss_x"] = float(((pred[:, 0] - gt[:, 0]) ** 2).mean())
    m["loss_y"] = float(((pred[:, 1] - gt[:, 1]) ** 2).mean())
    return m


def pointer_parse_accuracy(logits, dense):
    """Dense-parsing accuracy per attribute on the patches that hold an object's centre (|offset| < half a
    patch): does the ViT know what each object is? logits (B, N, colours + shapes + sizes), dense the labels of
    pointer_dense_labels (B, N, 5). -> dict(parse_acc_colour, parse_acc_shape, parse_acc_size); {} without labels.
    Shape near chance (0.25) with colour near 1 is the signature of a model that points at the right colour
    but the wrong shape."""
    dense = torch.as_tensor(dense)
    centre = (dense[..., 0].abs() < 0.5) & (dense[..., 1].abs() < 0.5)  # NaN offsets (background) compare False
    if not centre.any():
        return {}
    parts = torch.as_tensor(logits).float().split([POINTER_N_COLOUR, POINTER_N_SHAPE, POINTER_N_SIZE], -1)
    return {f"parse_acc_{name}": float((lg.argmax(-1) == dense[..., 2 + i].long())[centre].float().mean())
            for i, (name, lg) in enumerate(zip(("colour", "shape", "size"), parts))}


def pointer_error_breakdown(pred, samples, radius=5.0):
    """Where single-target answers go wrong. pred (N, 2) normalised; samples with 'objects' (frame px: x, y,
    half, size) and 'points'; samples without objects (real data) are skipped, so only synthetic scenes count,
    whose frame is the image's own pixels. -> dict:
      wrong_object  nearer another object's centre than the target's (grounding failures)
      near_miss     nearest the target but more than `radius` px off (imprecision on the right object)
      within_5px_small / _large      by the target's size
      within_5px_overlapped / _clear whether another object's box overlaps the target's
    (the within keys name 5 px for the default radius). Keys with no samples are left out; {} without objects."""
    groups = {k: [] for k in ("wrong", "near", "small", "large", "overlapped", "clear")}
    for p, s in zip(np.asarray(pred, dtype=np.float64).reshape(-1, 2), samples):
        if not s.get("objects"):
            continue
        frame = np.asarray(s["frame"], dtype=np.float64)
        p_px, t_px = (p + 1) / 2 * frame, (np.asarray(s["points"][0], dtype=np.float64) + 1) / 2 * frame
        objs = s["objects"]
        centres = np.array([[o["x"] + 0.5, o["y"] + 0.5] for o in objs])
        t = int(np.argmin(np.hypot(*(centres - t_px).T)))
        wrong = int(np.argmin(np.hypot(*(centres - p_px).T))) != t
        hit = float(np.hypot(*(p_px - t_px))) <= radius
        groups["wrong"].append(wrong)
        groups["near"].append(not wrong and not hit)
        groups[objs[t]["size"]].append(hit)
        overlapped = any(max(abs(o["x"] - objs[t]["x"]), abs(o["y"] - objs[t]["y"])) < o["half"] + objs[t]["half"]
                         for i, o in enumerate(objs) if i != t)
        groups["overlapped" if overlapped else "clear"].append(hit)
    names = dict(wrong="wrong_object", near="near_miss", small="within_5px_small", large="within_5px_large",
                 overlapped="within_5px_overlapped", clear="within_5px_clear")
    return {names[k]: float(np.mean(v)) for k, v in groups.items() if v}


def pointer_match(pred_px, gt_px, radius):
    """Largest one-to-one matching of predicted to ground-truth points within `radius` px (exact: brute
    force over assignments, point sets are small; ties broken by the smaller total distance)."""
    pred_px, gt_px = np.asarray(pred_px, dtype=np.float64).reshape(-1, 2), np.asarray(gt_px, dtype=np.float64).reshape(-1, 2)
    if len(pred_px) == 0 or len(gt_px) == 0:
        return 0
    d = np.sqrt(((pred_px[:, None] - gt_px[None]) ** 2).sum(-1))
    if len(pred_px) > 7 or len(gt_px) > 7:  # greedy beyond brute-force sizes
        pairs, used_p, used_g = sorted((d[i, j], i, j) for i in range(len(pred_px)) for j in range(len(gt_px))), set(), set()
        for dist, i, j in pairs:
            if dist <= radius and i not in used_p and j not in used_g:
                used_p.add(i), used_g.add(j)
        return len(used_p)
    small, big, dd = (pred_px, gt_px, d) if len(pred_px) <= len(gt_px) else (gt_px, pred_px, d.T)
    best = 0
    for perm in itertools.permutations(range(len(big)), len(small)):
        best = max(best, sum(dd[i, j] <= radius for i, j in enumerate(perm)))
    return int(best)


def pointer_sequence_matches(preds, gts, whs, radius):
    """Points matched one-to-one within `radius` px of each query's `wh` pixels, summed over queries."""
    return sum(pointer_match(pointer_denormalize(p, wh), pointer_denormalize(g, wh), radius)
               for p, g, wh in zip(preds, gts, whs))


def pointer_sequence_metrics(preds, gts, image_whs, frames=None, radius=5.0):
    """Sequential pointing from rolled-out sequences. preds/gts: lists of (K, 2) normalised arrays.
    precision = matched / predicted points, recall = matched / ground-truth points (one-to-one within
    `radius` px of each image's own pixels, image_whs, summed over queries; with frames the same beside in the
    384-tall frames, named with a 384 suffix); count accuracy and count MAE of the number of points emitted.
    Source: the Pointer journal's rollout count (no public scorer), defined here."""
    n_pred, n_gt = sum(len(p) for p in preds), sum(len(g) for g in gts)
    abs_err = [abs(len(p) - len(g)) for p, g in zip(preds, gts)]
    r, m = int(radius), {}
    for suffix, whs in (("", image_whs), (str(POINTER_FRAME), frames)):
        if whs is not None:
            matched = pointer_sequence_matches(preds, gts, whs, radius)
            m[f"seq_precision_{r}px{suffix}"] = matched / max(n_pred, 1)
            m[f"seq_recall_{r}px{suffix}"] = matched / max(n_gt, 1)
    return dict(m, count_acc=sum(e == 0 for e in abs_err) / max(len(gts), 1),
                count_mae=float(np.mean(abs_err)) if abs_err else 0.0)

# -----------------------------------------------------------------------------
# drawing: predicted point red, ground truth green, a yellow line between, err=XXpx


def pointer_draw(image, pred, gt, text="", size=256, image_wh=None):
    """(3, H, W) image, pred/gt (K, 2) normalised -> PIL image `size` x `size` with the points drawn.
    image_wh: the sample's original (W, H) (real images are resized to a square for the model, so the tensor's
    own shape no longer says); the picture is drawn at that aspect ratio (longer side `size`, the rest black)
    and the error label is in those pixels, as mean_px is. None: the tensor's shape, 384 tall."""
    im = to_pil(image)
    fw, fh = image_wh if image_wh is not None else (round(POINTER_FRAME * im.width / im.height), POINTER_FRAME)
    w, h = (size, max(1, round(size * fh / fw))) if fw >= fh else (max(1, round(size * fw / fh)), size)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(im.resize((w, h), Image.NEAREST), (0, 0))
    im = canvas
    d = ImageDraw.Draw(im)
    pred, gt = np.asarray(pred, dtype=np.float64).reshape(-1, 2), np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    to_px = lambda p: ((p[0] + 1) / 2 * w, (p[1] + 1) / 2 * h)
    labels = []
    for i in range(max(len(pred), len(gt))):
        if i < len(pred) and i < len(gt):
            d.line([to_px(pred[i]), to_px(gt[i])], fill=(255, 255, 0), width=1)
            labels.append(f"{pointer_pixel_errors(pred[i:i + 1], gt[i:i + 1], (fw, fh))[0]:.1f}")
        for pts, colour in ((gt, (0, 255, 0)), (pred, (255, 0, 0))):
            if i < len(pts):
                x, y = to_px(pts[i])
                d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    d.text((2, 2), text[:42], fill=(255, 255, 255))
    d.text((2, h - 12), "err=" + ",".join(labels) + "px" + (f" n={len(pred)}/{len(gt)}" if len(gt) != 1 else ""),
           fill=(255, 255, 0))
    return im

# -----------------------------------------------------------------------------
# train_pointer.py's pieces: config checks, model input, samples -> batches, rolled-out answers


def pointer_check_config(c):
    """The settings a run cannot start with, as one-line errors before anything is built."""
    if c["loss"] not in POINTER_LOSSES:
        raise InputError(f"loss must be one of {' | '.join(POINTER_LOSSES)}, got {c['loss']!r}")
    if c["image_attention"] not in ("bidirectional", "causal"):
        raise InputError(f"image_attention must be 'bidirectional' or 'causal', got {c['image_attention']!r}")
    if c["dataset"] not in ("synthetic", "jsonl"):
        raise InputError(f"dataset must be 'synthetic' or 'jsonl', got {c['dataset']!r}")
    if c["stem"] not in ("conv", "patch"):
        raise InputError(f"stem must be 'conv' or 'patch', got {c['stem']!r}")
    if not 0 <= c["multi_weight"] < 1:
        raise InputError(f"multi_weight is a share of the training queries, in [0, 1): got {c['multi_weight']}")
    if c["vit_init"] and (c["stem"] != "patch" or c["edge_channels"] or c["coord_channels"]):
        raise InputError(f"vit_init={c['vit_init']} is a pretrained encoder whose patch embedding reads RGB alone: set "
                         f"stem='patch', edge_channels=False and coord_channels=False")


def pointer_input_channels(edges, coords=True):
    return 3 + 4 * edges + 2 * coords  # RGB (+ 4 oriented edges) (+ 2 coordinates)


def pointer_model_input(images, edges, coords=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """(B, 3, H, W) in [0, 1] -> the ViT's input: RGB normalised with (mean, std) (a pretrained encoder's own),
    |Sobel| in 4 orientations (edges: summed over a patch they are an orientation histogram, so a linear patch
    embedding sees shape) and two channels holding each pixel's own (x, y) in [-1, 1] (coords: CoordConv, every
    patch embedding knows exactly where it is)."""
    x = normalize(images, mean, std)
    x = torch.cat([x, oriented_edges(x)], 1) if edges else x
    if not coords:
        return x
    B, _, H, W = x.shape
    ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1])
    return torch.cat([x, grid[None].expand(B, 2, H, W)], 1)


def pointer_fourier(xy, n_freq=8):
    """(..., 2) in [-1, 1] -> (..., 4 n_freq) sin/cos features: how a point is fed back into the sequence."""
    freqs = (2.0 ** torch.arange(n_freq, device=xy.device, dtype=xy.dtype)) * math.pi / 2
    ang = xy[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)


class PointerData:
    """train_pointer.py's data. A sample is a pure function of (seed, split, index) (synthetic scenes, or JSONL
    records in a seeded per-epoch order), a training batch a pure function of the step and rank, so a resumed run
    sees the same batches. Sequences: [bos, query, image x N, <|point|> x (K + 1)] (the last point token says done).
    c: the script's config (after setup); grid: image tokens per side. tok: a loaded LLM's tokenizer with
    pointer_specials() and <|image|>, <|pad|> appended, and vocab_size its model's (default: the byte-level
    data.Tokenizer); the prompt starts with the tokenizer's BOS where it has one."""

    def __init__(self, c, grid, tok=None, vocab_size=None):
        self.c, self.grid, self.n_vision = c, grid, grid * grid
        self.tok = tok or Tokenizer(specials=pointer_specials(c["word_tokens"]))
        self.vocab_size = vocab_size or self.tok.vocab_size
        self.bos = self.tok.bos
        self.image, self.point, self.pad = (self.tok[t] for t in ("<|image|>", "<|point|>", "<|pad|>"))
        # training queries: "every ..." at multi_weight, the other kinds keep their ratios; held-out ones as drawn
        mw = c["multi_weight"]
        self.train_weights = {k: w * (1 - mw) / (1 - POINTER_KIND_WEIGHTS["multi"]) for k, w in POINTER_KIND_WEIGHTS.items()}
        self.train_weights["multi"] = mw
        self.train_records = self.val_records = None
        if c["dataset"] == "jsonl":
            self.read_jsonl()

    def read_jsonl(self):
        c = self.c
        if not c["train_jsonl"] or not c["val_jsonl"]:
            raise InputError("dataset='jsonl' needs --train_jsonl=... and --val_jsonl=...")
        self.train_records, self.val_records = pointer_read_jsonl(c["train_jsonl"]), pointer_read_jsonl(c["val_jsonl"])
        print(f"jsonl: {len(self.train_records)} train / {len(self.val_records)} val records")
        for name, recs in (("train", self.train_records), ("val", self.val_records)):
            if n_long := sum(len(r["points_px"]) > c["max_points"] for r in recs):
                print(f"jsonl: {n_long} {name} records have more than max_points={c['max_points']} points: the model "
                      f"is taught their first {c['max_points']} (reading order); the val metrics count every point")
        if c["n_eval"] > len(self.val_records):
            print(f"n_eval={c['n_eval']} but {c['val_jsonl']} holds {len(self.val_records)} records: each is evaluated once")
        if not any(r["points_px"] for r in self.val_records[:c["n_eval"]]):
            raise InputError(f"{c['val_jsonl']}: no record among the first {min(c['n_eval'], len(self.val_records))} "
                             "has a point: there is no pixel error to measure")

    def check_checkpoint(self, meta):
        """A checkpoint's image size and vocabulary must be this data's."""
        c = self.c
        if meta["vit"]["image_size"] != c["img_size"]:
            raise InputError(f"checkpoint was trained at img_size={meta['vit']['image_size']}, config says {c['img_size']}")
        if (meta.get("word_tokens", c["word_tokens"]) != c["word_tokens"] or meta["gpt"]["vocab_size"] != self.vocab_size
                or self.tok.vocab_size > self.vocab_size):
            raise InputError(f"checkpoint was trained with word_tokens={meta.get('word_tokens')} (vocab "
                             f"{meta['gpt']['vocab_size']}), config says word_tokens={c['word_tokens']} (vocab "
                             f"{self.vocab_size})")

    def sample(self, split, index, kinds=POINTER_KINDS):
        c, train = self.c, split == "train"
        if c["dataset"] == "jsonl" and not train:
            return pointer_load_record(self.val_records[index % len(self.val_records)], c["img_size"])
        if c["dataset"] == "jsonl":
            epoch, i = divmod(index, len(self.train_records))
            s = pointer_load_record(self.train_records[epoch_order(len(self.train_records), c["seed"], epoch)[i]], c["img_size"])
        else:  # training scenes are crowded (train_cluster), held-out ones never
            s = pointer_synthetic_sample(c["seed"], split, index, c["img_size"], max_points=c["max_points"], kinds=kinds,
                                         cluster=c["train_cluster"] if train else 0.0,
                                         weights=self.train_weights if train else POINTER_KIND_WEIGHTS)
        if c["augment"] and train:
            rng = np.random.default_rng([c["seed"], 99, index])
            s["image"], s["points"], s["text"], scale = pointer_augment(s["image"], s["points"], s["text"], rng)
            s["halves"], s["objects"] = s["halves"] * scale, None  # dense labels are not transformed: ignored
            s["cand_points"] = None  # nor are the candidates: the grounding label falls back to the targets
        return s

    def eval_sets(self):
        """-> (single-point val queries, multi-point val queries, training queries for the train/val gap)."""
        c, single_kinds = self.c, tuple(k for k in POINTER_KINDS if k != "multi")
        if c["dataset"] == "jsonl":  # real data: single- and multi-point records come from one file, each once
            val = [self.sample("val", i) for i in range(min(c["n_eval"], len(self.val_records)))]
            single, multi = [s for s in val if len(s["points"]) == 1], [s for s in val if len(s["points"]) > 1]
        else:
            single = [self.sample("val", i, single_kinds) for i in range(c["n_eval"])]
            multi = [self.sample("val", 10**6 + i, ("multi",)) for i in range(c["n_eval_multi"])]
        # the pixel metrics are on single-point queries; a val file with none: on the first point (reading order)
        # of the multi-point ones. Records without points (nothing to point at) only train the done head.
        measured = (lambda s: len(s["points"]) == 1) if single else (lambda s: len(s["points"]) > 0)
        train = [s for s in (self.sample("train", i, single_kinds) for i in range(c["n_train_eval"])) if measured(s)]
        return single, multi, train

    def prompt(self, text):
        """[bos, query, image x N, point]: the query comes first so that (causal) image tokens can read it and
        each patch can decide locally whether it belongs to the referred object."""
        q = pointer_encode(self.tok, text, self.c["word_tokens"])[:self.c["max_query_len"]]
        return [self.bos] * (self.bos is not None) + q + [self.image] * self.n_vision + [self.point]

    def grounding_label(self, s):
        """The per-patch target of the grounding logit: the referred objects' patches or, for relation queries
        with ground_candidates, every candidate's (the words select them; the relation then picks one)."""
        mp = self.c["max_points"]
        if self.c["ground_candidates"] and s.get("kind") == "relation" and s.get("cand_points") is not None:
            return pointer_patch_mask(s["cand_points"], s["cand_halves"], self.grid)
        return pointer_patch_mask(s["points"][:mp], s["halves"][:mp], self.grid)

    def collate(self, samples):
        """Teacher-forced sequences: K target points -> K + 1 <|point|> tokens (the last says done); token j > 0
        carries point j - 1. Left padding keeps every sequence's point tokens at the end."""
        seqs, feeds, done = [], [], []
        for s in samples:
            pts = np.asarray(s["points"], dtype=np.float32).reshape(-1, 2)[:self.c["max_points"]]
            seqs.append(self.prompt(s["text"]) + [self.point] * len(pts))
            feeds.append(pts)
            done.append([0.0] * len(pts) + [1.0])
        ids, pad_mask = left_pad(seqs, pad_id=self.pad)
        B, T = ids.shape
        feed, feed_mask = torch.zeros(B, T, 2), torch.zeros(B, T, dtype=torch.bool)
        for b, pts in enumerate(feeds):  # point j feeds the (j+1)-th <|point|> token, len(pts) - j from the end
            for j, p in enumerate(pts):
                feed[b, T - len(pts) + j] = torch.from_numpy(p)
                feed_mask[b, T - len(pts) + j] = True
        xy = np.concatenate([np.concatenate([p, np.zeros((1, 2), np.float32)]) for p in feeds])
        return dict(ids=ids, pad_mask=pad_mask, images=torch.stack([s["image"] for s in samples]), feed=feed,
                    feed_mask=feed_mask, xy=torch.from_numpy(xy), done=torch.tensor([d for ds in done for d in ds]),
                    mask=torch.from_numpy(np.stack([self.grounding_label(s) for s in samples])),
                    dense=torch.from_numpy(np.stack([pointer_dense_labels(s.get("objects"), self.grid) for s in samples])))

    def train_batch(self, step, rank=0, world_size=1, micro=0):
        """Step (and micro-batch) -> this rank's training batch (CPU tensors). The k = grad_accum_steps micro-batches
        of a step hold the samples one batch of k * batch_size would."""
        k = self.c["grad_accum_steps"]
        idx = batch_indices(step * k + micro, self.c["batch_size"], rank, world_size)
        kinds = pointer_curriculum_kinds(step, self.c["curriculum_steps"])
        return self.collate([self.sample("train", i, kinds) for i in idx])

    def batches(self, start, stop, rank=0, world_size=1, pin_memory=False):
        """The training micro-batches of steps start..stop-1 in order (grad_accum_steps a step), built ahead in
        num_workers processes when asked."""
        k = self.c["grad_accum_steps"]
        return step_batches(lambda i: self.train_batch(i // k, rank, world_size, i % k), start * k, stop * k,
                            self.c["num_workers"], pin_memory=pin_memory)


@torch.no_grad()
def pointer_rollout(m, data, samples, max_len, ctx, dtype, device):
    """Rolled-out answers (never teacher-forced): the point tokens one by one, each fed the previous point, with a
    KV cache, until done > 0.5 (at least one point). m: the train script's Pointer. -> list of (K_i, 2) arrays."""
    ids, pad_mask = left_pad([data.prompt(s["text"]) for s in samples], pad_id=data.pad)
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    images = torch.stack([s["image"] for s in samples]).to(device)
    B, T = ids.shape
    cfg = m.gpt.config
    cache = KVCache(batch_size=B, num_heads=cfg.n_kv_head, seq_len=T + max_len, head_dim=cfg.n_embd // cfg.n_head,
                    num_layers=cfg.n_layer, device=device, dtype=getattr(torch, dtype))  # autocast's: no per-step cast
    with ctx:
        x = m.gpt.embed(ids, m.vision(images)[0])
        h_all = m.gpt.forward_embeds(x, pad_mask, cache, block=m.image_block(ids))
    h, img_h, rows = h_all[:, -1], m.image_states(ids, h_all), torch.arange(B, device=device)
    match = m.grounding(ids, pad_mask, h_all, img_h) if m.head_mode == "attend" else None
    out, stopped = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=device)
    for j in range(max_len):
        xy, done_logit, _ = m.heads(h, img_h, rows, match)
        xy = xy.float().clamp(-1, 1)
        stopped |= (done_logit.float() > 0) & (j > 0)
        for b in range(B):
            if not stopped[b]:
                out[b].append(xy[b].cpu().numpy())
        if bool(stopped.all()) or j == max_len - 1:
            break
        with ctx:
            x = m.gpt.transformer.wte(torch.full((B, 1), data.point, device=device)) + m.point_in(pointer_fourier(xy))[:, None]
            h = m.gpt.forward_embeds(x, kv_cache=cache)[:, -1]
    return [np.stack(o) for o in out]


def pointer_first_point_metrics(preds, samples, kinds=()):
    """Pixel metrics of the first rolled-out point against each sample's first point, within_5px per query kind
    (kinds: which kinds fail, grounding vs precision) and the error breakdown (pointer_error_breakdown)."""
    first, truth = np.stack([p[0] for p in preds]), np.stack([s["points"][0] for s in samples])
    image_whs, frames = np.array([s["image_wh"] for s in samples]), np.array([s["frame"] for s in samples])
    metrics = pointer_pixel_metrics(first, truth, image_whs, frames)
    ok, sample_kinds = pointer_pixel_errors(first, truth, image_whs) <= 5, np.array([s["kind"] for s in samples])
    for k in kinds:
        if (sample_kinds == k).any():
            metrics[f"within_5px_{k}"] = float(ok[sample_kinds == k].mean())
    metrics.update(pointer_error_breakdown(first, samples))
    return metrics


def pointer_eval_picture(path, single, pred1, multi, pred_multi, n_vis=8):
    """The eval PNG: n_vis single-point and n_vis multi-point queries, 4 a row. -> path, or None (nothing drawn)."""
    vis = [pointer_draw(s["image"], p[:1], s["points"][:1], s["text"], image_wh=s["image_wh"])
           for s, p in zip(single[:n_vis], pred1)]
    vis += [pointer_draw(s["image"], p, s["points"], s["text"], image_wh=s["image_wh"])
            for s, p in zip(multi[:n_vis], pred_multi)]
    return save_png(image_grid(vis, 4), path) if vis else None
