"""
LaneLM data: the lane coordinate tokenizer, synthetic road scenes with TuSimple-form labels, the TuSimple and
CULane readers, the official TuSimple metric (accuracy / FP / FN, plus CLRNet's F1), the official CULane metric
(F1 at IoU 0.5 / 0.75, mF1) and the drawing helper (LaneLM's own data code, as each recipe's lives in
data_<recipe>.py; every public name starts with `lane_`, `tusimple_` or `culane_`).

Coordinates. Labels always live in the label frame (TuSimple: 1280 x 720): a lane is a list of x values,
one per `h_samples` row, -2 where the lane is absent. Images are rendered/resized to a small model frame
(160 x 96 by default) but labels are never rescaled, so the official 20 px threshold keeps its meaning
(20 label px = 2.5 model px at 160 wide). CULane's frame is 1640 x 590 (the official metric draws 30 px lanes
there), its lanes (x, y) points every 10 px up from y = 590, put on their own row grid (culane_row_grid).

Rows. ROW tokens index one global row grid, y = 160, 160 + h_step, ... < 720 (lane_row_grid; TuSimple's 56
rows at h_step=10), never an image's own h_samples: TuSimple's clips label different rows (0313: 240..710,
the others 160..710), and a token must mean one y everywhere. An image's lanes are put on the grid
(lane_to_grid, absent rows -2) before encoding and decoded lanes are read back at its h_samples
(lane_from_grid); every h_samples row must lie on the grid (checked when the labels are read).
"""
import json
import math
import os

import numpy as np
import torch

from data import epoch_order, image_grid, load_image, sample_rng, save_png, to_pil
from model import InputError

TUSIMPLE_W, TUSIMPLE_H = 1280, 720
TUSIMPLE_H_SAMPLES = list(range(160, 720, 10))  # the 56 rows of TuSimple's test set
CULANE_W, CULANE_H = 1640, 590
CULANE_TOP = 40                                 # the top row of CULane's ROW grid (its lanes end well below)
LANE_GRID_TOP = 160                             # the first row of the ROW grid (TuSimple's top labelled row)
LANE_TOKENIZATIONS = ("relative_disjoint", "absolute", "relative")

# -----------------------------------------------------------------------------
# lane tokenizer


class LaneTokenizer:
    """Lane <-> tokens. One sequence per lane:  BOS_k ROW_r p_r p_r-1 ... EOS   (empty lane: BOS_k EOS).

    BOS_k is the lane-id prompt (one BOS per lane index, so each prompt asks for one lane, not for all of them),
    ROW_r says at which row of the global row grid (lane_row_grid: one y in every image) the lane starts, then
    one point token per row until EOS. Lanes are written bottom-up (bottom_up=True): the first, absolute point
    is the nearest one, where lanes are wide apart and easy to tell apart, and the relative steps walk towards
    the vanishing point.
    A point is an x bin (bin = floor(x / (label_w / nbins_x)), decoded at the bin centre, so a round trip is
    within half a bin).

    Id layout (relative_disjoint, nbins_x=200, max_abs_dx=32, max_rows=56, max_lanes=4 -> vocab 330):
        [0, nbins_x)                 ABS x bin
        [nbins_x, +2*max_abs_dx+1)   DX  signed bin step -max_abs_dx..+max_abs_dx (relative_disjoint only)
        [.., +max_rows)              ROW start row: an index into the global row grid
        GAP                          this row is absent inside a lane (next point re-anchors absolutely)
        REANCHOR                     'relative' only: the next ABS-range token is an absolute bin
        EOS
        BOS_0 .. BOS_{max_lanes-1}
        IMAGE                        vision-token slot (input only)
        PAD                          right padding (input only, never a target)

    Modes: relative_disjoint (default): first point ABS, then DX in its own id range; a step larger than
    max_abs_dx is written as an ABS token (re-anchor), never clamped. absolute: every point ABS.
    relative (kept for ablation; the overlapping layout of the original LaneLM code): DX codes reuse the ABS id range
    (code = nbins_x//2 + dx), their meaning set by position; a large step is REANCHOR + ABS."""

    def __init__(self, mode="relative_disjoint", nbins_x=200, max_abs_dx=32, max_rows=56, max_lanes=4,
                 label_w=TUSIMPLE_W, bottom_up=True):
        if mode not in LANE_TOKENIZATIONS:
            raise InputError(f"tokenization must be one of {LANE_TOKENIZATIONS}, got {mode!r}")
        if mode == "relative" and max_abs_dx >= nbins_x // 2:
            raise InputError(f"relative mode shares the ABS range: max_abs_dx ({max_abs_dx}) must be < nbins_x//2")
        self.mode, self.nbins, self.max_dx, self.step = mode, nbins_x, max_abs_dx, -1 if bottom_up else 1
        self.max_rows, self.max_lanes, self.label_w = max_rows, max_lanes, label_w
        self.bin_w = label_w / nbins_x
        n_dx = 2 * max_abs_dx + 1 if mode == "relative_disjoint" else 0
        self.dx0 = nbins_x                       # first DX id
        self.row0 = self.dx0 + n_dx              # first ROW id
        self.gap = self.row0 + max_rows
        self.reanchor = self.gap + 1
        self.eos = self.gap + 2
        self.bos0 = self.gap + 3
        self.image = self.bos0 + max_lanes
        self.pad = self.image + 1
        self.vocab_size = self.pad + 1

    def bos(self, lane_id):
        if not 0 <= lane_id < self.max_lanes:
            raise ValueError(f"lane id {lane_id} outside 0..{self.max_lanes - 1}")
        return self.bos0 + lane_id

    def x_bin(self, x):
        return int(min(self.nbins - 1, max(0, math.floor(x / self.bin_w))))

    def bin_x(self, b):
        return (b + 0.5) * self.bin_w

    def encode(self, xs, lane_id, with_key=False):
        """xs: x per grid row (label px, < 0 = absent) -> [BOS_k, ROW, points..., EOS]
        (with_key: and per id whether it is a key token: the start row, every absolutely anchored point (the
        first, after a GAP, after a step > max_abs_dx) and EOS, whatever the mode writes for them)."""
        if len(xs) > self.max_rows:
            raise ValueError(f"lane has {len(xs)} rows but the tokenizer has max_rows={self.max_rows}")
        ids, key = [self.bos(lane_id)], [False]
        valid = [i for i, x in enumerate(xs) if x >= 0]
        if valid:
            first, last = (valid[-1], valid[0]) if self.step < 0 else (valid[0], valid[-1])
            ids.append(self.row0 + first)
            key.append(True)
            prev = None  # previous bin; None = the next point must be absolute
            for r in range(first, last + self.step, self.step):
                if xs[r] < 0:
                    ids.append(self.gap)
                    key.append(False)
                    prev = None
                    continue
                b = self.x_bin(xs[r])
                anchor = prev is None or abs(b - prev) > self.max_dx
                if self.mode == "absolute" or prev is None:
                    ids.append(b)
                elif not anchor:
                    ids.append(self.dx0 + self.max_dx + (b - prev) if self.mode == "relative_disjoint"
                               else self.nbins // 2 + (b - prev))
                elif self.mode == "relative_disjoint":
                    ids.append(b)  # disjoint ranges: an ABS token re-anchors unambiguously
                else:
                    ids += [self.reanchor, b]
                    key.append(False)
                key.append(anchor)
                prev = b
        ids.append(self.eos)
        key.append(True)
        return (ids, key) if with_key else ids

    def decode(self, ids, n_rows):
        """Tokens after the prompt (a leading BOS is skipped) -> (xs list of n_rows, -2 absent; ok flag).
        Never raises: an invalid sequence returns what was decoded so far and ok=False."""
        xs = [-2.0] * n_rows
        ids = [int(i) for i in ids]
        if ids and self.bos0 <= ids[0] < self.bos0 + self.max_lanes:
            ids = ids[1:]
        if not ids or ids[0] == self.eos:
            return xs, bool(ids)
        if not self.row0 <= ids[0] < self.row0 + self.max_rows:
            return xs, False
        row, prev, absolute_next = ids[0] - self.row0, None, True
        for t in ids[1:]:
            if t == self.eos:
                return xs, True
            if t == self.gap:
                row, prev, absolute_next = row + self.step, None, True
                continue
            if t == self.reanchor:
                absolute_next = True
                continue
            if not 0 <= row < n_rows:
                return xs, False  # runs past the first/last row
            if t < self.nbins:
                if self.mode == "relative" and not absolute_next:
                    b = prev + t - self.nbins // 2
                else:
                    b = t
            elif self.mode == "relative_disjoint" and self.dx0 <= t < self.row0 and prev is not None:
                b = prev + t - self.dx0 - self.max_dx
            else:
                return xs, False  # a DX with nothing to be relative to, a ROW/BOS/IMAGE/PAD mid-lane
            if not 0 <= b < self.nbins:
                return xs, False  # stepped off the image
            xs[row] = self.bin_x(b)
            row, prev, absolute_next = row + self.step, b, self.mode == "absolute"
        return xs, False  # no EOS

    def describe(self):
        return (f"{self.mode}: ABS 0..{self.nbins - 1}"
                + (f", DX {self.dx0}..{self.row0 - 1}" if self.row0 > self.dx0 else "")
                + f", ROW {self.row0}..{self.gap - 1}, GAP {self.gap}, REANCHOR {self.reanchor}, EOS {self.eos}, "
                f"BOS {self.bos0}..{self.image - 1}, IMAGE {self.image}, PAD {self.pad} (vocab {self.vocab_size})")


def lane_sort(lanes):
    """Non-empty lanes, left to right by the x of their lowest labelled point."""
    lanes = [list(map(float, l)) for l in lanes if any(x >= 0 for x in l)]
    return sorted(lanes, key=lambda l: [x for x in l if x >= 0][-1])


def lane_slots(lanes, max_lanes=4, centre=TUSIMPLE_W / 2):
    """Lane id = an ego-relative slot (the CULane convention): with 4 slots, 0 = second lane left of the
    camera, 1 = first left, 2 = first right, 3 = second right; sides by the x of the lowest labelled point
    against the image centre. Which lane a BOS_k asks for is then a local question about the image
    (the 'k-th lane from the left' needs counting). -> (max_lanes lanes or None, lanes that had no slot)."""
    lanes = lane_sort(lanes)
    left = [l for l in lanes if [x for x in l if x >= 0][-1] < centre][::-1]   # nearest first
    right = [l for l in lanes if [x for x in l if x >= 0][-1] >= centre]
    half = max_lanes // 2
    slots = [None] * max_lanes
    for j, l in enumerate(left[:half]):
        slots[half - 1 - j] = l
    for j, l in enumerate(right[:max_lanes - half]):
        slots[half + j] = l
    return slots, max(0, len(left) - half) + max(0, len(right) - (max_lanes - half))


def lane_row_grid(h_step, label_h=TUSIMPLE_H):
    """The rows ROW tokens index, the same in every image: y = 160, 160 + h_step, ... < label_h."""
    if h_step <= 0:
        raise InputError(f"h_step must be > 0 (the row grid's spacing in label px), got {h_step}")
    return list(range(LANE_GRID_TOP, label_h, h_step))


def lane_to_grid(xs, h_samples, rows):
    """A lane labelled at an image's h_samples -> x per grid row (-2 on rows the image has no label for)."""
    at = {y: i for i, y in enumerate(rows)}
    out = [-2.0] * len(rows)
    for x, y in zip(xs, h_samples):
        out[at[y]] = float(x)
    return out


def lane_from_grid(xs, h_samples, rows):
    """x per grid row -> the lane at an image's h_samples (the inverse of lane_to_grid on its rows)."""
    at = {y: i for i, y in enumerate(rows)}
    return [xs[at[y]] for y in h_samples]



def lane_seg_target(slots, h_samples, grid_w, grid_h, label_w=TUSIMPLE_W, label_h=TUSIMPLE_H):
    """Per-slot lane mask for the auxiliary segmentation loss (as CLRNet / UFLD train their backbones):
    (grid_h, grid_w) int64, 0 = background, k + 1 = the lane in slot k. Each labelled lane's polyline is
    sampled at least twice per grid cell and every sample marks its cell (a later slot wins a shared cell)."""
    target = np.zeros((grid_h, grid_w), dtype=np.int64)
    ys = np.asarray(h_samples, dtype=np.float64) * grid_h / label_h
    for k, lane in enumerate(slots):
        if lane is None:
            continue
        xs = np.asarray(lane, dtype=np.float64) * grid_w / label_w
        ok = np.asarray(lane) >= 0
        px, py = [xs[ok]], [ys[ok]]  # every labelled point, isolated ones included
        for r in range(len(xs) - 1):
            if ok[r] and ok[r + 1]:
                n = int(2 * max(abs(xs[r + 1] - xs[r]), abs(ys[r + 1] - ys[r]))) + 2
                f = np.linspace(0.0, 1.0, n)
                px.append(xs[r] + f * (xs[r + 1] - xs[r]))
                py.append(ys[r] + f * (ys[r + 1] - ys[r]))
        px, py = np.concatenate(px), np.concatenate(py)
        target[np.clip(py.astype(int), 0, grid_h - 1), np.clip(px.astype(int), 0, grid_w - 1)] = k + 1
    return target

# -----------------------------------------------------------------------------
# synthetic road scenes


def lane_synthetic_sample(rng, img_w=160, img_h=96, h_samples=None, max_lanes=4, supersample=2, max_cars=2,
                          max_shadows=1, noise=0.02, lighting=0.5, dash_freq=0.6, tilt=1.0):
    """One road scene: 2..max_lanes lanes as smooth perspective curves converging to a vanishing point
    (camera tilt moves the horizon), solid or dashed, white or yellow, occluded by vehicles, with shadows,
    lighting and texture noise. Returns dict(image (3, img_h, img_w) float [0,1], lanes (left to right,
    TuSimple form in the 1280x720 label frame), h_samples).
    Difficulty knobs (defaults = the 10-minute CPU default; a harder scene in brackets):
    max_cars vehicles (occlusion) [3], max_shadows shadow bands [2], noise = max sensor noise std [0.04],
    lighting = scale of the brightness/contrast/colour/gamma jitter [1.0], dash_freq = dash cycles per unit
    of ground depth 1/t (t = 1 at the bottom row) [0.15-0.25: a dashed lane then often showed a single dash,
    or none, in the lower half of the image], tilt = scale of the horizon's (camera pitch) range [1.0]."""
    from PIL import Image, ImageDraw
    hs = np.asarray(TUSIMPLE_H_SAMPLES if h_samples is None else h_samples, dtype=np.float64)
    W, H = TUSIMPLE_W, TUSIMPLE_H
    for _ in range(50):  # rejection: every lane must be visible on >= 6 rows
        # a dash camera in its lane: 1-2 lanes each side of the image centre (2..max_lanes in all)
        half = max_lanes // 2
        n_left, n_right = int(rng.integers(1, half + 1)), int(rng.integers(1, max_lanes - half + 1))
        n = n_left + n_right
        vy = 290 + tilt * rng.uniform(-40, 40)         # horizon (camera tilt)
        vx = rng.uniform(540, 740)                     # camera yaw
        bend = rng.uniform(-160, 160) * (rng.random() < 0.7)  # road curvature, felt near the horizon
        lane_w = rng.uniform(330, 480)                 # lane spacing at the bottom row
        ego = rng.uniform(0.3, 0.7)                    # where in its lane the camera sits
        xb = W / 2 - ego * lane_w + (np.arange(n) - n_left + 1) * lane_w
        start = vy + rng.uniform(12, 45, size=n)      # lanes fade out before the horizon
        D = H - vy

        def lane_x(k, y):
            t = (y - vy) / D
            return vx + bend * (1 - t) ** 2 + (xb[k] - vx) * t

        lanes = []
        for k in range(n):
            x = lane_x(k, hs)
            ok = (hs >= start[k]) & (x >= 0) & (x < W)
            lanes.append(np.where(ok, np.round(x, 1), -2.0))
        if all((l >= 0).sum() >= 6 for l in lanes):
            break
    S = supersample
    cw, ch = img_w * S, img_h * S
    sx, sy = cw / W, ch / H
    # sky, ground, road
    sky = np.array([rng.uniform(120, 220), rng.uniform(140, 225), rng.uniform(170, 240)])
    grass = np.array([rng.uniform(40, 110), rng.uniform(60, 130), rng.uniform(30, 90)])
    road = rng.uniform(55, 135)
    img = Image.new("RGB", (cw, ch), tuple(int(c) for c in grass))
    draw = ImageDraw.Draw(img)
    hy = vy * sy
    for i in range(8):  # sky: a coarse vertical gradient
        f = i / 8
        draw.rectangle([0, f * hy, cw, (f + 0.125) * hy + 1], fill=tuple(int(c * (0.85 + 0.15 * f)) for c in sky))
    margin = 0.7 * lane_w
    left = [(vx + bend) * sx, hy], [(xb[0] - margin) * sx, ch]
    right = [(xb[-1] + margin) * sx, ch], [(vx + bend) * sx, hy]
    draw.polygon([tuple(p) for p in (*left, *right)], fill=(int(road),) * 3)
    # texture: patches of lighter/darker asphalt and a few shadow bands
    for _ in range(int(rng.integers(3, 9))):
        y0 = rng.uniform(hy, ch)
        r = rng.uniform(4, 30) * S * (y0 - hy) / (ch - hy + 1e-6) + 1
        x0 = rng.uniform(0, cw)
        g = int(np.clip(road + rng.uniform(-25, 25), 0, 255))
        draw.ellipse([x0 - 2 * r, y0 - r, x0 + 2 * r, y0 + r], fill=(g, g, g))
    for _ in range(int(rng.integers(0, max_shadows + 1))):
        y0, h0 = rng.uniform(hy, ch), rng.uniform(2, 10) * S
        g = int(road * rng.uniform(0.45, 0.75))
        draw.polygon([(0, y0), (cw, y0 + rng.uniform(-8, 8) * S), (cw, y0 + h0), (0, y0 + h0)], fill=(g, g, g))
    # lane markings, drawn densely in y; dashes are periodic in ground distance (~ 1 / (y - vy))
    ys = np.arange(vy + 2, H + 5, 5.0)
    for k in range(n):
        yellow = rng.random() < 0.2
        colour = (235, 200, 60) if yellow else (int(rng.uniform(190, 255)),) * 3
        dashed = rng.random() < 0.5
        period, duty, phase = dash_freq * rng.uniform(0.8, 1.25), rng.uniform(0.35, 0.6), rng.uniform()
        width = rng.uniform(12, 22)  # label px at the bottom row
        for y0, y1 in zip(ys[:-1], ys[1:]):
            if y0 < start[k]:
                continue
            t = (y0 - vy) / D
            if dashed and ((1.0 / t) * period + phase) % 1.0 > duty:
                continue
            w = max(1, int(round(width * t * sx)))
            draw.line([(lane_x(k, y0) * sx, y0 * sy), (lane_x(k, y1) * sx, y1 * sy)], fill=colour, width=w)
    # vehicles: boxes standing on the road, nearer ones drawn last; they hide lane marks, labels stay
    n_cars = int(rng.integers(0, max_cars + 1))
    cars = sorted(rng.uniform(0.15, 0.95, size=n_cars))
    for t in cars:
        y_bot = vy + t * D
        pos = rng.uniform(-0.5, n - 0.5)  # fractional lane index: straddles a marking sometimes
        x_mid = np.interp(pos, np.arange(n), [lane_x(k, y_bot) for k in range(n)], left=None, right=None)
        if n > 1:
            x_mid += (pos - np.clip(pos, 0, n - 1)) * (lane_x(1, y_bot) - lane_x(0, y_bot))
        cw_ = 0.75 * lane_w * t
        chh = cw_ * rng.uniform(0.6, 0.9)
        col = tuple(int(c) for c in rng.uniform(10, 240, size=3))
        box = [(x_mid - cw_ / 2) * sx, (y_bot - chh) * sy, (x_mid + cw_ / 2) * sx, y_bot * sy]
        draw.rectangle(box, fill=col)
        draw.rectangle([box[0], box[3] - 0.15 * (box[3] - box[1]), box[2], box[3]], fill=(20, 20, 20))
    img = img.resize((img_w, img_h), Image.BOX)
    x = np.asarray(img, dtype=np.float32) / 255.0  # numpy, not torch: tiny torch ops thrash a loaded CPU
    # lighting (brightness, contrast, colour cast, gamma) and sensor noise
    L = lighting
    x = (x - 0.5) * (1 + L * rng.uniform(-0.3, 0.2)) + 0.5 * (1 + L * rng.uniform(-0.3, 0.25))
    x = x * (1 + L * rng.uniform(-0.1, 0.1, size=3)).astype(np.float32)
    x = np.clip(x, 0, 1) ** np.exp(L * rng.uniform(-0.22, 0.22))
    x = x + rng.standard_normal((img_h, img_w, 1)).astype(np.float32) * rng.uniform(0.1, 1.0) * noise
    x = torch.from_numpy(np.ascontiguousarray(np.clip(x, 0, 1).transpose(2, 0, 1), dtype=np.float32))
    return dict(image=x, lanes=[l.tolist() for l in lanes], h_samples=hs.astype(int).tolist(), raw_file="")

# -----------------------------------------------------------------------------
# TuSimple reader


def tusimple_read_labels(root, label_files, rows=None):
    """TuSimple label files (one JSON object per line: lanes, h_samples, raw_file) -> list of entries.
    label_files: list or comma-separated string of paths relative to root. Every line is checked here, so
    bad data stops the run before training: its form, lane lengths, the image on disk, and (rows = the
    ROW grid) that every h_samples row lies on the grid once."""
    if isinstance(label_files, str):
        label_files = [f for f in label_files.split(",") if f]
    entries = []
    for name in label_files:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"TuSimple label file not found: {path}")
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    entries.append(tusimple_check_entry(line, f"{path}:{n}", root, rows))
    return entries


def tusimple_check_entry(line, where, root, rows=None):
    """One label line -> dict(lanes, h_samples, raw_file), or an InputError naming the line and the problem."""
    try:
        e = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not a TuSimple label line ({err})") from None
    if not isinstance(e, dict) or any(k not in e for k in ("lanes", "h_samples", "raw_file")):
        raise InputError(f"{where}: not a TuSimple label line (want an object with lanes, h_samples, raw_file)")
    lanes, hs, raw = e["lanes"], e["h_samples"], e["raw_file"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(hs, list) or not all(number(y) for y in hs):
        raise InputError(f"{where}: h_samples must be a list of row numbers, got {hs!r:.60}")
    if not isinstance(lanes, list) or not all(isinstance(l, list) and all(number(x) for x in l) for l in lanes):
        raise InputError(f"{where}: lanes must be a list of lists of x values, got {lanes!r:.60}")
    bad = [v for v in hs + [x for l in lanes for x in l] if not math.isfinite(v)]
    if bad:  # json reads NaN and Infinity: NaN would become an absent point, Infinity crash the tokenizer
        raise InputError(f"{where}: a lane or h_samples value is {bad[0]} (want finite numbers; -2 = absent)")
    if not isinstance(raw, str) or not raw:
        raise InputError(f"{where}: raw_file must be an image path, got {raw!r}")
    lane_check_inside(raw, root, where)
    if any(len(l) != len(hs) for l in lanes):
        raise InputError(f"{where}: a lane has a different length than h_samples ({len(hs)})")
    if len(set(hs)) != len(hs):
        raise InputError(f"{where}: h_samples repeats a row")
    off = [y for y in hs if rows is not None and y not in rows]
    if off:
        raise InputError(f"{where}: h_samples row {off[0]} is not on the ROW grid {rows[0]}..{rows[-1]} "
                         f"(its spacing is h_step; TuSimple's rows need h_step=10)")
    if not os.path.exists(os.path.join(root, raw)):
        raise FileNotFoundError(f"{where}: image {raw} not found under {root}")
    return dict(lanes=lanes, h_samples=hs, raw_file=raw)


def lane_check_inside(path, root, where):
    """A label's image path must be relative and stay under the data root (no absolute path, no ../ out)."""
    parts = os.path.normpath(path).split(os.sep)
    if os.path.isabs(path) or parts[0] == "..":
        raise InputError(f"{where}: image path {path!r} is outside the data root {root}")


def tusimple_sample(entry, root, img_w=160, img_h=96):
    """A label entry -> the same sample dict as the synthetic generator (image resized, labels untouched)."""
    image = load_image(os.path.join(root, entry["raw_file"]), size=(img_w, img_h))
    return dict(image=image, lanes=[list(map(float, l)) for l in entry["lanes"]],
                h_samples=list(entry["h_samples"]), raw_file=entry["raw_file"])

# -----------------------------------------------------------------------------
# the official TuSimple metric (TuSimple/tusimple-benchmark evaluate/lane.py), re-implemented without sklearn


def tusimple_angle(xs, y_samples):
    """Angle of the least-squares line x = k y + b through the lane's points (0 for < 2 points)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(y_samples, dtype=np.float64)
    xs, ys = xs[xs >= 0], ys[xs >= 0]
    if len(xs) <= 1:
        return 0.0
    yc = ys - ys.mean()
    denom = (yc ** 2).sum()
    k = (yc * (xs - xs.mean())).sum() / denom if denom > 0 else 0.0
    return math.atan(k)


def tusimple_line_accuracy(pred, gt, thresh):
    """Share of the gt's rows (absent rows included) where |pred - gt| < thresh, absent = -100."""
    pred = np.array([p if p >= 0 else -100 for p in pred], dtype=np.float64)
    gt = np.array([g if g >= 0 else -100 for g in gt], dtype=np.float64)
    return float(np.sum(np.abs(pred - gt) < thresh) / len(gt))


def tusimple_bench(pred, gt, y_samples, running_time=0.0, pixel_thresh=20, pt_thresh=0.85):
    """One image, exactly as LaneEval.bench (TuSimple's evaluate/lane.py): -> (accuracy, fp rate, fn rate,
    matched gt lanes). Per gt lane: threshold 20 / cos(angle); its best pred's point accuracy; matched if
    >= 0.85. FP = (#pred - #matched) / #pred, negative when one prediction matches two gt lanes (as official);
    FN = #unmatched / min(#gt, 4); with > 4 gt lanes the worst lane is dropped from the accuracy and one FN
    forgiven. More than #gt + 2 predictions scores (0, 0, 1)."""
    if any(len(p) != len(y_samples) for p in pred):
        raise ValueError("Format of lanes error: a predicted lane's length differs from h_samples")
    if running_time > 200 or len(gt) + 2 < len(pred):
        return 0.0, 0.0, 1.0, 0
    threshs = [pixel_thresh / math.cos(tusimple_angle(x, y_samples)) for x in gt]
    line_accs, fn, matched = [], 0.0, 0.0
    for x_gts, thresh in zip(gt, threshs):
        accs = [tusimple_line_accuracy(x_preds, x_gts, thresh) for x_preds in pred]
        max_acc = max(accs) if accs else 0.0
        if max_acc < pt_thresh:
            fn += 1
        else:
            matched += 1
        line_accs.append(max_acc)
    fp = len(pred) - matched
    if len(gt) > 4 and fn > 0:
        fn -= 1
    s = sum(line_accs)
    if len(gt) > 4:
        s -= min(line_accs)
    return (s / max(min(4.0, len(gt)), 1.0), fp / len(pred) if len(pred) > 0 else 0.0,
            fn / max(min(len(gt), 4.0), 1.0), int(matched))


def tusimple_f1(fp, fn):
    """F1 from the dataset-level FP and FN rates as CLRNet computes it (clrnet/utils/tusimple_metric.py:
    tp = 1 - FP, P = tp / (tp + FP), R = tp / (tp + FN)). Deliberate difference: a negative FP (one
    prediction matching two gt lanes, which LaneEval allows) counts as 0, so F1 never exceeds 1."""
    fp = max(fp, 0.0)
    tp = 1.0 - fp
    if tp <= 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def tusimple_metrics(preds, gts, y_samples_list):
    """Dataset means of accuracy, FP, FN as TuSimple's evaluate/lane.py (LaneEval.bench_one_submit) reports
    them, plus F1 as CLRNet reports it (tusimple_f1). preds, gts: per image a list of lanes (x per row, -2
    absent); one prediction list per image. Deliberate difference: all-absent predicted lanes are dropped
    before scoring (a submission lists only the lanes it found), so they are no FP; every gt lane counts,
    all-absent ones included, as LaneEval scores the label file's lanes as they are."""
    if not len(preds) == len(gts) == len(y_samples_list):
        raise InputError(f"tusimple_metrics: {len(preds)} predictions for {len(gts)} images "
                         f"({len(y_samples_list)} h_samples lists): one of each per image")
    acc = fp = fn = 0.0
    for pred, gt, ys in zip(preds, gts, y_samples_list):
        pred = [p for p in pred if any(x >= 0 for x in p)]
        a, p, f, _ = tusimple_bench(pred, gt, ys)
        acc, fp, fn = acc + a, fp + p, fn + f
    n = max(len(gts), 1)
    return dict(tusimple_acc=acc / n, fp=fp / n, fn=fn / n, f1=tusimple_f1(fp / n, fn / n))

# -----------------------------------------------------------------------------
# CULane: its layout, and the official metric (XingangPan/SCNN tools/lane_evaluation)


def culane_row_grid(h_step):
    """The rows ROW tokens index on CULane: y = 590, 590 - h_step, ... >= 40, listed top-down (CULane labels a
    point every 10 px up from its bottom row, 590; 40..590 at h_step=10 is 56 rows)."""
    if h_step <= 0:
        raise InputError(f"h_step must be > 0 (the row grid's spacing in label px), got {h_step}")
    return list(range(CULANE_H, CULANE_TOP - 1, -h_step))[::-1]


def culane_read_list(root, list_file):
    """A CULane list (list/train_gt.txt or list/test.txt: the image path first on each line, root-relative with a
    leading /; train_gt's mask path and lane flags are not used) -> entries dict(raw_file, points), points = per
    lane its (x, y) points from the .lines.txt beside the image. Checked here: paths, files, every value."""
    path = os.path.join(root, list_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CULane list not found: {path}")
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.split():
                continue
            raw = line.split()[0]
            raw = raw[1:] if raw.startswith("/") else raw
            lane_check_inside(raw, root, f"{path}:{n}")
            if not os.path.exists(os.path.join(root, raw)):
                raise FileNotFoundError(f"{path}:{n}: image {raw} not found under {root}")
            lines = os.path.join(root, os.path.splitext(raw)[0] + ".lines.txt")
            if not os.path.exists(lines):
                raise FileNotFoundError(f"{path}:{n}: lane file {lines} not found (CULane keeps one beside each image)")
            entries.append(dict(raw_file=raw, points=culane_read_lanes(lines)))
    return entries


def culane_read_lanes(path):
    """A .lines.txt (one lane per line: x1 y1 x2 y2 ...) -> per lane a list of (x, y), exactly as written."""
    lanes = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                v = [float(t) for t in fields]
            except ValueError:
                raise InputError(f"{path}:{n}: not a number in a lane line ({line.strip()[:60]!r})") from None
            if len(v) % 2:
                raise InputError(f"{path}:{n}: {len(v)} values, an odd number (a lane is x y pairs)")
            if not all(math.isfinite(x) for x in v):
                raise InputError(f"{path}:{n}: a lane point is {next(x for x in v if not math.isfinite(x))} "
                                 "(want finite numbers)")
            lanes.append(list(zip(v[0::2], v[1::2])))
    return lanes


def culane_read_categories(root):
    """list/test_split/test<k>_<name>.txt (CULane's 9 test scenarios) -> {image path: name}; {} when absent."""
    folder = os.path.join(root, "list", "test_split")
    cats = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".txt") and "_" in name:
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if line.split():
                        path = line.split()[0]
                        cats[path[1:] if path.startswith("/") else path] = name[:-4].split("_", 1)[1]
    return cats


def culane_to_grid(points, rows, label_w=CULANE_W):
    """A lane's (x, y) points -> x per grid row: linear between its points (points on the rows are kept
    exactly), -2 outside its y span and where x leaves the image."""
    pts = sorted(points, key=lambda p: p[1])
    ys, xs = [p[1] for p in pts], [p[0] for p in pts]
    out = []
    for y in rows:
        x = float(np.interp(y, ys, xs)) if pts and ys[0] <= y <= ys[-1] else -2.0
        out.append(x if 0 <= x < label_w else -2.0)
    return out


def culane_from_grid(xs, rows):
    """x per grid row -> the lane's (x, y) points, bottom-up as CULane writes them (absent rows left out)."""
    return [(x, y) for x, y in zip(xs[::-1], rows[::-1]) if x >= 0]


def culane_sample(entry, root, rows, img_w=160, img_h=96):
    """An entry -> the sample dict every reader yields (lanes on the row grid), plus its points as labelled."""
    image = load_image(os.path.join(root, entry["raw_file"]), size=(img_w, img_h))
    return dict(image=image, lanes=[culane_to_grid(l, rows) for l in entry["points"]], h_samples=list(rows),
                points=entry["points"], raw_file=entry["raw_file"])


def culane_spline(points, times=50):
    """SCNN's lane resampling (src/spline.cpp, splineInterpTimes): a natural cubic spline through the points in
    chord-length parameter, `times` samples per interval plus the last point, in float32 as its Point2f; two
    points are drawn as they are (lane_compare.cpp). Repeated consecutive points are dropped first (the C++
    divides by their zero distance)."""
    p = np.asarray(points, dtype=np.float32).astype(np.float64).reshape(-1, 2)
    p = p[np.r_[True, (np.diff(p, axis=0) != 0).any(1)]]
    n = len(p)
    if n <= 2:
        return p.astype(np.float32)
    h = np.sqrt(((p[1:] - p[:-1]) ** 2).sum(1))
    slope = (p[1:] - p[:-1]) / h[:, None]
    # second derivatives M at the interior points (tridiagonal system, Thomas algorithm); M = 0 at both ends
    A, B, C, D = h[:-1], 2 * (h[:-1] + h[1:]), h[1:].copy(), 6 * (slope[1:] - slope[:-1])
    C[0], D[0] = C[0] / B[0], D[0] / B[0]
    for i in range(1, n - 2):
        tmp = B[i] - A[i] * C[i - 1]
        C[i], D[i] = C[i] / tmp, (D[i] - A[i] * D[i - 1]) / tmp
    M = np.zeros((n, 2))
    M[n - 2] = D[n - 3]
    for i in range(n - 4, -1, -1):
        M[i + 1] = D[i] - C[i] * M[i + 2]
    hh = h[:, None]
    b, c, d = slope - (2 * hh * M[:-1] + hh * M[1:]) / 6, M[:-1] / 2, (M[1:] - M[:-1]) / (6 * hh)
    t = ((h / times)[:, None] * np.arange(times))[:, :, None]
    out = p[:-1, None] + b[:, None] * t + c[:, None] * t ** 2 + d[:, None] * t ** 3
    return np.vstack([out.reshape(-1, 2), p[-1:]]).astype(np.float32)


def culane_lane_mask(points, width=30, shape=(CULANE_H, CULANE_W)):
    """A lane drawn as SCNN draws it (cv::line, thickness `width`, between its spline samples rounded to whole
    pixels) -> bool (H, W) mask. Deliberate difference: OpenCV's rasteriser is re-drawn in numpy: a pixel is on
    a segment when within width/2 + half a pixel (along the major axis) of its line and within its ends, or
    within width/2 of an end point (OpenCV's filled polygon + round caps; equal on axis-aligned lanes).
    Painted row by row: on each pixel row a segment covers at most three x intervals (its band, two caps)."""
    H, W = shape
    r, eps = width / 2, 1e-6
    v = np.rint(culane_spline(points)).astype(np.float64)  # cvRound: halves to even, as np.rint
    v = v[np.r_[True, (np.diff(v, axis=0) != 0).any(1)]]
    if len(v) == 1:
        v = np.vstack([v, v])
    a, b = v[:-1], v[1:]
    length = np.hypot(*(b - a).T)
    ux, uy = ((b - a) / np.maximum(length, 1e-12)[:, None]).T
    half = 0.5 * np.maximum(np.abs(ux), np.abs(uy))  # the half pixel OpenCV's edge lines add
    # every (segment, pixel row) pair within reach of the segment
    y0 = np.floor(np.minimum(a[:, 1], b[:, 1]) - r - 1)
    n_rows = (np.ceil(np.maximum(a[:, 1], b[:, 1]) + r + 1) - y0 + 1).astype(int)
    seg = np.repeat(np.arange(len(a)), n_rows)
    y = y0[seg] + np.arange(len(seg)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    ax, ay, bx, by, ux, uy, ls, hf = a[seg, 0], a[seg, 1], b[seg, 0], b[seg, 1], ux[seg], uy[seg], length[seg], half[seg]
    dy = y - ay
    # band: |perp| = |dy*ux - dx*uy| <= r + half and -half <= along = dx*ux + dy*uy <= length + half (dx = x - ax)
    lo, hi = np.full(len(y), -np.inf), np.full(len(y), np.inf)
    ok = ls > 0
    for coef, off, bound_lo, bound_hi in ((-uy, dy * ux, -(r + hf), r + hf), (ux, dy * uy, -hf, ls + hf)):
        nz = np.abs(coef) > 1e-12
        c = np.where(nz, coef, 1.0)
        e1, e2 = (bound_lo - off) / c, (bound_hi - off) / c
        lo = np.where(nz, np.maximum(lo, np.minimum(e1, e2)), lo)
        hi = np.where(nz, np.minimum(hi, np.maximum(e1, e2)), hi)
        ok &= nz | ((off >= bound_lo - eps) & (off <= bound_hi + eps))
    spans = [(ax + lo, ax + hi, ok)]
    for cx, cy in ((ax, ay), (bx, by)):  # round caps
        h2 = r * r - (y - cy) ** 2
        w = np.sqrt(np.maximum(h2, 0))
        spans.append((cx - w, cx + w, h2 >= -eps))
    x_lo, x_hi, ok = (np.concatenate(z) for z in zip(*spans))
    x_lo, x_hi, rows = np.clip(np.ceil(x_lo - eps), 0, W), np.clip(np.floor(x_hi + eps) + 1, 0, W), np.tile(y, 3)
    ok &= (x_lo < x_hi) & (rows >= 0) & (rows < H)
    # +1 where an interval starts, -1 after it ends; a running sum along each row > 0 = covered
    at = (rows[ok] * (W + 1)).astype(np.int64)
    edges = np.concatenate([at + x_lo[ok].astype(np.int64), at + x_hi[ok].astype(np.int64)])
    weights = np.concatenate([np.ones(ok.sum()), -np.ones(ok.sum())])
    diff = np.bincount(edges, weights, minlength=H * (W + 1)).reshape(H, W + 1)
    return np.cumsum(diff, axis=1)[:, :W] > 0.5


def culane_ious(gt, pred, width=30, shape=(CULANE_H, CULANE_W)):
    """(#gt, #pred) raster IoU of every pair (lane_compare.cpp get_lane_similarity; a lane of < 2 points: 0)."""
    masks = lambda lanes: np.stack([culane_lane_mask(l, width, shape).ravel() if len(l) >= 2  # noqa: E731
                                    else np.zeros(shape[0] * shape[1], dtype=bool) for l in lanes]).astype(np.float32)
    if not gt or not pred:
        return np.zeros((len(gt), len(pred)))
    g, p = masks(gt), masks(pred)
    inter = (g @ p.T).astype(np.float64)
    union = g.sum(1)[:, None] + p.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def lane_assignment(score):
    """Maximum-score one-to-one matching of rows to columns, exact (the Hungarian algorithm with potentials,
    O(n^2 m)) -> [(row, col)], min(rows, cols) pairs."""
    s = np.asarray(score, dtype=np.float64)
    flip = s.shape[0] > s.shape[1]
    cost = (-s.T if flip else -s).tolist()
    n, m = len(cost), len(cost[0]) if cost else 0
    u, v, owner, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):  # add row i, then grow the shortest augmenting path from it (1-based, column 0 = root)
        owner[0], j0 = i, 0
        dist, used = [math.inf] * (m + 1), [False] * (m + 1)
        while owner[j0]:
            used[j0], i0, delta, j1 = True, owner[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < dist[j]:
                        dist[j], way[j] = cur, j0
                    if dist[j] < delta:
                        delta, j1 = dist[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    dist[j] -= delta
            j0 = j1
        while j0:  # flip the path
            j1 = way[j0]
            owner[j0], j0 = owner[j1], j1
    pairs = [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    return sorted((c, r) for r, c in pairs) if flip else sorted(pairs)


CULANE_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # mF1: 0.50, 0.55, ..., 0.95


def culane_counts(pred, gt, width=30, shape=(CULANE_H, CULANE_W)):
    """One image as SCNN's Counter::count_im_pair: IoU of every (gt, pred) pair, a maximum-IoU one-to-one
    matching, TP = matched pairs with IoU > threshold, FP = #pred - TP, FN = #gt - TP
    -> (tp, fp, fn), each an int array over CULANE_IOU_THRESHOLDS."""
    ious = culane_ious(gt, pred, width, shape)
    matched = np.array([ious[i, j] for i, j in lane_assignment(ious)]) if gt and pred else np.zeros(0)
    tp = (matched[None] > np.array(CULANE_IOU_THRESHOLDS)[:, None]).sum(1)
    return tp, len(pred) - tp, len(gt) - tp


def lane_f1(tp, fp, fn):
    """F1 = 2PR / (P + R) from counts (0 when nothing is right)."""
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def culane_metrics(preds, gts, categories=None, width=30, shape=(CULANE_H, CULANE_W)):
    """CULane's official metric (XingangPan/SCNN tools/lane_evaluation: evaluate.cpp, counter.cpp,
    lane_compare.cpp, spline.cpp): lanes of 30 px on the 1640x590 image, TP iff IoU > 0.5, F1 from the dataset's
    TP/FP/FN totals; f1_75 at IoU 0.75 and mf1 the mean F1 over 0.50:0.05:0.95 (CLRNet's culane_metric.py).
    preds, gts: per image its lanes as (x, y) points; categories: per image its test scenario (list/test_split)
    or None: f1_50_<name> and fp_<name> per scenario (CULane reports FP alone for 'cross', which has no lanes).
    Deliberate differences: the numpy rasteriser (culane_lane_mask) and an exact assignment (as CLRNet's port,
    scipy's; the C++ KM takes edges within 0.01 of tight as tight and can stop just short of the optimum)."""
    if len(preds) != len(gts) or (categories is not None and len(categories) != len(gts)):
        raise InputError(f"culane_metrics: {len(preds)} predictions for {len(gts)} images"
                         + (f" ({len(categories)} categories)" if categories is not None else "")
                         + ": one of each per image")
    totals = {}
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        counts = np.stack(culane_counts(pred, gt, width, shape))
        for key in ["all"] + ([categories[i]] if categories is not None and categories[i] else []):
            totals[key] = totals.get(key, 0) + counts
    tp, fp, fn = totals.get("all", np.zeros((3, len(CULANE_IOU_THRESHOLDS)), dtype=int))
    f1 = [lane_f1(*c) for c in zip(tp, fp, fn)]
    at50, at75 = CULANE_IOU_THRESHOLDS.index(0.5), CULANE_IOU_THRESHOLDS.index(0.75)
    out = dict(f1_50=f1[at50], f1_75=f1[at75], mf1=float(np.mean(f1)),
               precision=tp[at50] / max(tp[at50] + fp[at50], 1), recall=tp[at50] / max(tp[at50] + fn[at50], 1))
    for name in sorted(k for k in totals if k != "all"):
        t, p, n = totals[name][:, at50]
        out[f"f1_50_{name}"], out[f"fp_{name}"] = lane_f1(t, p, n), int(p)
    return {k: float(v) if not isinstance(v, int) else v for k, v in out.items()}

# -----------------------------------------------------------------------------
# drawing


def lane_draw(image, h_samples, gt=(), pred=(), scale=3, label_w=TUSIMPLE_W, label_h=TUSIMPLE_H):
    """Image with ground-truth lanes in green and predictions in red (points joined per row) -> PIL."""
    from PIL import Image, ImageDraw
    im = to_pil(image)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    sx, sy = im.width / label_w, im.height / label_h
    for lanes, colour, w in ((gt, (0, 255, 0), 3), (pred, (255, 0, 0), 1)):
        for lane in lanes:
            pts = [(x * sx, y * sy) if x >= 0 else None for x, y in zip(lane, h_samples)]
            for a, b in zip(pts[:-1], pts[1:]):
                if a is not None and b is not None:
                    draw.line([a, b], fill=colour, width=w)
            for p in pts:
                if p is not None:
                    draw.ellipse([p[0] - w, p[1] - w, p[0] + w, p[1] + w], fill=colour)
    return im


def lane_draw_grid(panels, path, cols=4):
    """lane_draw panels -> one PNG at path (None when there is nothing to draw)."""
    return save_png(image_grid(panels, cols), path) if panels else None

# -----------------------------------------------------------------------------
# the recipe's samples


class LaneData:
    """The samples a run reads: each a pure function of (seed, split, index), so a resume is exact and DDP's
    ranks together draw one process's batch. dataset='synthetic': generated roads, labelled at the row grid's
    rows; 'tusimple' (label files) and 'culane' (list files): the labels read and checked once (bad data stops
    the run before training), each image decoded when asked for. overfit=True: every sample is the first
    training image with min(max_lanes, 4) lanes, the image the overfit target must decode 4 lanes of."""

    def __init__(self, dataset, seed, img_w, img_h, rows, max_lanes, data_root="", train_labels="", val_labels="",
                 overfit=False, **synthetic):
        self.dataset, self.seed, self.img_w, self.img_h = dataset, seed, img_w, img_h
        self.rows, self.max_lanes, self.root, self.synthetic = rows, max_lanes, data_root, synthetic
        self.entries, self.overfit_index, self.categories = None, None, {}
        if dataset in ("tusimple", "culane"):
            if not data_root:
                raise InputError(f"dataset={dataset!r} needs --data_root=<dir with " + (
                    "clips/ and label_data_*.json>" if dataset == "tusimple" else "list/ and the driver_* folders>"))
            if dataset == "tusimple":
                read = lambda files: tusimple_read_labels(data_root, files, rows)  # noqa: E731
            else:
                read = lambda files: [e for f in files.split(",") if f for e in culane_read_list(data_root, f)]  # noqa: E731
                self.categories = culane_read_categories(data_root)
            self.entries = dict(train=read(train_labels), val=read(val_labels))
            for split, files in (("train", train_labels), ("val", val_labels)):
                if not self.entries[split]:
                    raise InputError(f"no {split} labels in {files!r} under {data_root}")
        elif dataset != "synthetic":
            raise InputError(f"dataset must be 'synthetic', 'tusimple' or 'culane', got {dataset!r}")
        if overfit:
            n_want = min(max_lanes, 4)
            n_try = 1000 if self.entries is None else min(1000, len(self.entries["train"]))
            index = next((i for i in range(n_try) if len(lane_sort(self.labels(i))) >= n_want), None)
            if index is None:
                raise InputError(f"overfit=True needs a training image with {n_want} lanes; none in the first {n_try}")
            self.overfit_index = index

    def labels(self, index):
        """The lanes of training sample `index` (real data: from the labels alone, no image decoding)."""
        if self.entries is None:
            return self.get("train", index)["lanes"]
        entry = self.entry("train", index)
        return entry["lanes"] if self.dataset == "tusimple" else [culane_to_grid(l, self.rows) for l in entry["points"]]

    def n_val(self):
        """The number of held-out images (None: synthetic, as many as asked for)."""
        return None if self.entries is None else len(self.entries["val"])

    def entry(self, split, index):
        entries = self.entries[split]
        if split == "train":  # a fresh shuffle per epoch, the same on every rank
            index = epoch_order(len(entries), self.seed, index // len(entries))[index % len(entries)]
        return entries[index]

    def get(self, split, index):
        """-> dict(image (3, img_h, img_w) in [0, 1], lanes (label frame, x per h_samples row), h_samples; CULane:
        points, the lanes as labelled)."""
        if self.overfit_index is not None:
            split, index = "train", self.overfit_index
        if self.entries is None:
            return lane_synthetic_sample(sample_rng(self.seed, split, index), self.img_w, self.img_h, self.rows,
                                         self.max_lanes, **self.synthetic)
        if self.dataset == "culane":
            return culane_sample(self.entry(split, index), self.root, self.rows, self.img_w, self.img_h)
        return tusimple_sample(self.entry(split, index), self.root, self.img_w, self.img_h)
