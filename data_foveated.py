"""
Foveated video recipe: synthetic "find the mover" videos, a real clip reader, frozen next-frame latent
encoders (a fixed random high-pass encoder by default; a TAESD-style VAE encoder from safetensors as the
real option), the config and input checks, the ViT's input planes, eval metrics, attention diagnostics and the
attention-strip drawing.

The synthetic task (task='track'): a small textured sprite (the target) moves with momentum among sprites
of the same family (distractors) that also move with momentum and switch colour at the same rate. It is
outlined only in the first frames (the cue, as a tracker is given the first box); after that nothing but the
continuity of its motion tells it apart, so a static query cannot know where to look, while the history (where
it was, how it moves) tells where it will be. The prediction target is the next frame's TARGET LAYER (the
target drawn alone on black) through the frozen encoder at a spatial grid: where the tracked object will be
and what it will look like. With the old target (the whole frame's latent, globally pooled, as change since
frame 0) and static distractors, a diffuse static read was (near) optimal: only the target changed, so
differencing global reads recovered it without ever locating it, and no foveation gain was possible.
task='static_large' is the control: a large, still target that a static query can always see.
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import resolve_checkpoint
from data import load_image, normalize, read_json, sample_rng, save_png
from model import InputError

# -----------------------------------------------------------------------------
# synthetic videos

FOV_COLORS = {"red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.3, 0.95),
              "yellow": (0.95, 0.9, 0.15), "cyan": (0.1, 0.9, 0.9), "magenta": (0.9, 0.2, 0.9)}
FOV_COLOR_NAMES = list(FOV_COLORS)
FOV_PATTERNS = ("checker", "hstripe", "vstripe", "ring")
FOV_DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
FOV_TASKS = ("track", "static_large")


def fov_pattern(name, size):
    """Binary (size, size) texture: which pixels of a sprite get its bright colour."""
    i, j = np.mgrid[0:size, 0:size]
    if name == "checker":
        return ((i + j) % 2 == 0).astype(np.float32)
    if name == "hstripe":
        return (i % 2 == 0).astype(np.float32)
    if name == "vstripe":
        return (j % 2 == 0).astype(np.float32)
    if name == "ring":
        return ((i == 0) | (j == 0) | (i == size - 1) | (j == size - 1)).astype(np.float32)
    raise ValueError(f"unknown pattern {name!r}; expected one of {FOV_PATTERNS}")


def fov_sprite(pattern, color_name, size):
    """(size, size, 3) sprite: the pattern's on-pixels in the colour, off-pixels in a dark shade of it."""
    on = fov_pattern(pattern, size)[..., None]
    c = np.asarray(FOV_COLORS[color_name], dtype=np.float32)
    return on * c + (1 - on) * 0.3 * c


def fov_direction(vx, vy):
    """8-way compass name of a velocity in image coordinates (y grows downwards)."""
    k = int(round(math.atan2(vy, vx) / (math.pi / 4))) % 8
    return FOV_DIRECTIONS[k]


def fov_background(rng, size):
    """Static smooth clutter: a tinted gradient plus a few soft low-contrast blobs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.3, 0.6, 3).astype(np.float32)
    g = rng.uniform(-0.15, 0.15, (2, 3)).astype(np.float32)
    img = base + xx[..., None] * g[0] + yy[..., None] * g[1]
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img + blob * rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    return img


def fov_mover(rng, size, s, center=False):
    """A sprite's start (x, y) and velocity: anywhere (or mid-frame), 1.5-2.5 px per frame in any direction."""
    pos = np.full(2, (size - s) / 2.0) if center else rng.uniform(0, size - s, 2)
    speed, angle = rng.uniform(1.5, 2.5), rng.uniform(0, 2 * math.pi)
    return pos, np.array([math.cos(angle), math.sin(angle)]) * speed


def fov_step(pos, vel, size, s, kick=None):
    """Move one frame with momentum, bouncing off the walls. kick: a random change of velocity (px/frame) added
    after the move, so where a sprite goes next drifts from where its past motion points."""
    pos, vel = pos + vel, vel.copy()
    if kick is not None:
        vel = vel + kick
        speed = float(np.hypot(*vel))
        vel = vel * np.clip(speed, 1.0, 3.0) / max(speed, 1e-6)  # keep the speed in 1-3 px/frame
    for k in range(2):
        if pos[k] < 0 or pos[k] > size - s:
            vel[k] = -vel[k]
            pos[k] = np.clip(pos[k], 0, size - s)
    return pos, vel


def fov_synthetic_video(rng, task="track", n_frames=8, size=32, n_distractors=3, sprite=4,
                        large_sprite=16, noise=0.04, specks=1, cue_frames=2, p_change=0.25, center_start=True,
                        jitter=0.0):
    """One video, a pure function of rng. -> dict(frames (T, 3, H, W) float32 in [0, 1], target_layer
    (T, 3, H, W): the target sprite alone on black (no cue, clutter or noise), caption, target_xy (T, 2)
    top-left pixel of the target per frame, target_color (T,), distractor_xy (T, n_distractors, 2), target_size).

    Distractors are true look-alikes: the same sprite family, same size, moving with their own momentum and
    switching colour at the same rate as the target. So after the cue frames (the target outlined in white,
    as a tracker is given the first box) only the continuity of its motion tells the target apart: differencing
    global reads of two frames sees every sprite change, not the target's. Each sprite switches colour (its
    pattern stays) with probability p_change per frame, so the target's current colour must be looked at.
    center_start: the target starts mid-frame (a tracker's known start). task='static_large' (the control):
    the target is large and still, so a static query always sees it. jitter > 0: every sprite's velocity gets a
    random kick (std jitter px/frame per axis) each frame, so dead reckoning from the cue drifts and only
    looking at the current frame keeps the track."""
    if task not in FOV_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {FOV_TASKS}")
    scene = fov_background(rng, size)
    s = sprite if task == "track" else large_sprite
    # sprite 0 is the target, 1.. the distractors: (pattern, colour, position, velocity) each
    pats = [FOV_PATTERNS[i] for i in rng.integers(len(FOV_PATTERNS), size=1 + n_distractors)]
    cols = [int(c) for c in rng.integers(6, size=1 + n_distractors)]
    still = (rng.uniform(0, size - s, 2), np.zeros(2))
    movers = [fov_mover(rng, size, s, center=center_start) if task == "track" else still]
    movers += [fov_mover(rng, size, sprite) for _ in range(n_distractors)]
    sizes = [s] + [sprite] * n_distractors
    color0, vel0 = cols[0], movers[0][1]
    frames, layer, xy, dxy, colors = [], [], [], [], []
    for t in range(n_frames):
        img = scene.copy()
        tgt = np.zeros_like(scene)
        u, step = rng.uniform(size=len(cols)), rng.integers(1, 6, size=len(cols))  # drawn every frame
        corners = []
        for i in range(len(cols)):
            if t > 0 and u[i] < p_change:  # a new colour that persists: only looking tells it
                cols[i] = (cols[i] + int(step[i])) % 6
            corners.append((int(round(movers[i][0][0])), int(round(movers[i][0][1]))))
        for i in range(len(cols) - 1, -1, -1):  # distractors first, the target on top
            (x, y), w = corners[i], sizes[i]
            if i == 0 and t < cue_frames:  # the cue: a white outline around the target
                img[max(0, y - 1):y + w + 1, max(0, x - 1):x + w + 1] = 1.0
            img[y:y + w, x:x + w] = fov_sprite(pats[i], FOV_COLOR_NAMES[cols[i]], w)
        x, y = corners[0]
        tgt[y:y + s, x:x + s] = fov_sprite(pats[0], FOV_COLOR_NAMES[cols[0]], s)
        for _ in range(specks):  # flickering single-pixel clutter, new every frame (unpredictable)
            px, py = rng.integers(0, size, 2)
            img[py, px] = rng.uniform(0, 1, 3)
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
        frames.append(np.clip(img, 0, 1).transpose(2, 0, 1))
        layer.append(tgt.transpose(2, 0, 1))
        xy.append(corners[0])
        dxy.append(corners[1:])
        colors.append(cols[0])
        kicks = rng.normal(0, jitter, (len(movers), 2)) if jitter > 0 and task == "track" else [None] * len(movers)
        movers = [fov_step(p, v, size, w, k) for (p, v), w, k in zip(movers, sizes, kicks)]
    name = FOV_COLOR_NAMES[color0]
    caption = f"{name} {pats[0]} moving {fov_direction(*vel0)}" if task == "track" else f"large {name} {pats[0]} still"
    return dict(frames=torch.from_numpy(np.stack(frames)), target_layer=torch.from_numpy(np.stack(layer)),
                caption=caption, target_xy=torch.tensor(xy, dtype=torch.long), target_color=torch.tensor(colors),
                distractor_xy=torch.tensor(dxy, dtype=torch.long).view(n_frames, n_distractors, 2), target_size=s)


def fov_synthetic_captions(task):
    """Every caption fov_synthetic_video can write for this task (checked against caption_tokens at startup)."""
    if task == "track":
        return [f"{c} {p} moving {d}" for c in FOV_COLOR_NAMES for p in FOV_PATTERNS for d in FOV_DIRECTIONS]
    return [f"large {c} {p} still" for c in FOV_COLOR_NAMES for p in FOV_PATTERNS]


def fov_synthetic_batch(seed, split, indices, **kw):
    """Stacked videos for these global indices; each one a pure function of (seed, split, index)."""
    vids = [fov_synthetic_video(sample_rng(seed, split, i), **kw) for i in indices]
    return dict(frames=torch.stack([v["frames"] for v in vids]), captions=[v["caption"] for v in vids],
                target_layer=torch.stack([v["target_layer"] for v in vids]),
                target_xy=torch.stack([v["target_xy"] for v in vids]), target_size=vids[0]["target_size"])

# -----------------------------------------------------------------------------
# real clips: <dir>/captions.json {"clip": "caption", ...} and per clip <dir>/clip.npy (T, H, W, 3), uint8 0-255
# or float 0-1, or a folder <dir>/clip/ of frame images (in natural order: f2 before f10)


def fov_list_clips(data_dir):
    path = os.path.join(data_dir, "captions.json")
    captions = read_json(path, "captions.json ({clip_name: caption})")
    if not isinstance(captions, dict) or not captions:
        raise InputError(f"{path} must be a non-empty JSON object {{clip_name: caption}}")
    return sorted(captions.items())


def fov_natural_key(name):
    """Sort key that orders the numbers in a name by value: f2 < f10 (plain text order puts f10 first)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def fov_clip_source(data_dir, name):
    """-> ('npy', the array memory-mapped) or ('frames', the frame paths in natural order): nothing decoded yet."""
    npy, folder = os.path.join(data_dir, name + ".npy"), os.path.join(data_dir, name)
    if os.path.exists(npy):
        arr = np.load(npy, mmap_mode="r")
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"{npy}: expected (T, H, W, 3), got {arr.shape}")
        return "npy", arr
    if os.path.isdir(folder):
        files = sorted((f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg"))),
                       key=fov_natural_key)
        if not files:
            raise InputError(f"clip folder {folder} has no .png/.jpg frames")
        return "frames", [os.path.join(folder, f) for f in files]
    raise FileNotFoundError(f"clip {name!r}: neither {npy} nor the folder {folder} exists")


def fov_float_frames(x, where):
    """Float frames must already be in [0, 1]: 0-255 floats would be clamped to a white clip without a word."""
    if x.size and float(x.max()) > 1.0:
        raise InputError(f"{where}: {x.dtype} frames must be in [0, 1] (max {float(x.max()):.4g}); save 0-255 "
                         f"frames as uint8")


def fov_check_clip(data_dir, name, n_frames):
    """Startup check of one clip (so a bad clip fails before training, not when it is first drawn): enough
    frames; for a float .npy, its first frame in [0, 1] (the cheap read; fov_load_clip checks what it loads)."""
    kind, src = fov_clip_source(data_dir, name)
    if len(src) < n_frames:
        raise InputError(f"clip {name!r} has {len(src)} frames, fewer than n_frames={n_frames}")
    if kind == "npy" and src.dtype != np.uint8:
        fov_float_frames(np.asarray(src[:1]), os.path.join(data_dir, name + ".npy"))


def fov_load_clip(data_dir, name, n_frames, size):
    """-> (T, 3, size, size) float in [0, 1]; T frames sampled evenly over the clip (only those are read)."""
    kind, src = fov_clip_source(data_dir, name)
    if len(src) < n_frames:
        raise InputError(f"clip {name!r} has {len(src)} frames, fewer than n_frames={n_frames}")
    pick = np.linspace(0, len(src) - 1, n_frames).round().astype(int)
    if kind == "frames":
        return torch.stack([load_image(src[i], size) for i in pick]).clamp(0, 1)
    arr = np.asarray(src[pick])
    if arr.dtype != np.uint8:
        fov_float_frames(arr, os.path.join(data_dir, name + ".npy"))
    x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)).permute(0, 3, 1, 2)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def fov_clip_split(clips, split):
    """Deterministic held-out split: every 10th clip (by sorted name, from the first) is 'val', the rest 'train'."""
    if len(clips) < 2:
        raise InputError(f"task='folder' needs at least 2 clips (one held out for val, the rest to train); "
                         f"got {len(clips)}")
    return [c for i, c in enumerate(clips) if (i % 10 == 0) == (split == "val")]


def fov_folder_batch(data_dir, clips, indices, n_frames, size):
    """Clips for these indices; training indices wrap around the list (eval caps n_eval at the val clips)."""
    picked = [clips[i % len(clips)] for i in indices]
    frames = torch.stack([fov_load_clip(data_dir, name, n_frames, size) for name, _ in picked])
    return dict(frames=frames, captions=[c for _, c in picked], target_xy=None, target_size=0)

# -----------------------------------------------------------------------------
# frozen next-frame latent encoders (pluggable: anything mapping (B, 3, H, W) in [0, 1] -> (B, D))


class FovFixedEncoder(nn.Module):
    """The default frozen "latent" encoder: a seeded random bank of zero-mean 3x3 colour filters
    (high-pass, so the smooth background gives ~0), rectified, average-pooled to a grid x grid map.
    Deterministic (a function of seed only) and never trained."""

    def __init__(self, channels=8, grid=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(channels, 3, 3, 3, generator=g)
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean: flat regions respond 0
        self.register_buffer("weight", w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        self.grid, self.dim = grid, channels * grid * grid

    @torch.no_grad()
    def forward(self, x):
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight).abs()  # borders stay flat
        return F.adaptive_avg_pool2d(y, self.grid).flatten(1)


def _taesd_conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _TaesdBlock(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_taesd_conv(n_in, n_out), nn.ReLU(), _taesd_conv(n_out, n_out), nn.ReLU(),
                                  _taesd_conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class FovTaesdEncoder(nn.Module):
    """The real option: the tiny VAE encoder of TAESD (madebyollin/taesd, diffusers AutoencoderTiny),
    weights from a .safetensors file, frozen; latents (4, H/8, W/8) average-pooled to grid x grid."""

    def __init__(self, path=None, latent_channels=4, grid=4, width=64):
        super().__init__()
        c = width
        self.layers = nn.Sequential(
            _taesd_conv(3, c), _TaesdBlock(c, c),
            _taesd_conv(c, c, stride=2, bias=False), _TaesdBlock(c, c), _TaesdBlock(c, c), _TaesdBlock(c, c),
            _taesd_conv(c, c, stride=2, bias=False), _TaesdBlock(c, c), _TaesdBlock(c, c), _TaesdBlock(c, c),
            _taesd_conv(c, c, stride=2, bias=False), _TaesdBlock(c, c), _TaesdBlock(c, c), _TaesdBlock(c, c),
            _taesd_conv(c, latent_channels))
        self.grid, self.dim = grid, latent_channels * grid * grid
        if path:
            self.load(path)
        self.requires_grad_(False)

    def load(self, path):
        from safetensors.torch import load_file
        if not os.path.exists(path):
            raise FileNotFoundError(f"latent encoder weights not found: {path}")
        state = {}
        for k, v in load_file(path).items():  # accept taesd ("0.weight"), ours ("layers.0.") and diffusers names
            for prefix in ("encoder.layers.", "layers.", "encoder."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            state[k] = v
        missing, unexpected = self.layers.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{path} is not a TAESD encoder: missing {missing[:4]}, unexpected {unexpected[:4]}")

    @torch.no_grad()
    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(x), self.grid).flatten(1)


def fov_latent_encoder(spec, channels=8, grid=2, seed=0):
    """'fixed' -> FovFixedEncoder; a path to .safetensors -> FovTaesdEncoder with those weights."""
    if spec == "fixed":
        return FovFixedEncoder(channels, grid, seed)
    if spec.endswith(".safetensors"):
        return FovTaesdEncoder(spec, grid=grid)
    raise InputError(f"latent_encoder must be 'fixed' or a path to a .safetensors TAESD encoder, got {spec!r}")

# -----------------------------------------------------------------------------
# diagnostics


def fov_attention_stats(maps):
    """maps (..., N): attention distributions over N patches. -> (mean entropy in nats, mean max weight).
    Uniform over N gives (ln N, 1/N); one-hot gives (0, 1)."""
    p = maps.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return float(entropy.mean()), float(p.max(-1).values.mean())


def fov_hollow_warnings(m, n_patches, cos_max=0.95, mean_frac=0.9, entropy_frac=0.95):
    """Warnings (strings) when an eval's ratio may be hollow: the coarse (static-query) path at the
    predict-the-mean loss, reads of both paths nearly the same, or the static query's attention near uniform.
    A ratio over a baseline that has not learned measures nothing about looking (notes/foveated.md has two).
    A diagnostic only: it never changes whether a target is met."""
    out = []
    if m["loss_coarse"] > mean_frac * m["loss_mean"]:
        out.append(f"coarse path not clearly below the mean: loss_coarse {m['loss_coarse']:.4g} vs predict-the-mean "
                   f"{m['loss_mean']:.4g}; the ratio compares against a baseline that has not learned")
    if m["cos_z_fine_coarse"] > cos_max:
        out.append(f"fine and coarse reads nearly the same (cos_z_fine_coarse {m['cos_z_fine_coarse']:.3f} > "
                   f"{cos_max}): the predicted queries read what the static one reads")
    if m["entropy_coarse"] > entropy_frac * math.log(n_patches):
        out.append(f"the static query's attention is near uniform (entropy_coarse {m['entropy_coarse']:.3f}, "
                   f"ln N = {math.log(n_patches):.3f}): a whole-frame average")
    return out


def fov_cosine(a, b):
    """Mean cosine similarity between matching rows of a and b (..., D)."""
    return float(F.cosine_similarity(a.detach().float().flatten(0, -2), b.detach().float().flatten(0, -2), dim=-1).mean())


def fov_per_frame_mse(pred, target):
    """(B, T, D) x2 -> list of T mean squared errors (one per predicted frame)."""
    return ((pred.float() - target.float()) ** 2).mean(dim=(0, 2)).tolist()


def fov_target_patches(target_xy, target_size, image_size, patch_size):
    """(B, T, N) bool: the patches each frame's target overlaps. target_xy (B, T, 2) top-left pixels."""
    g = image_size // patch_size
    B, T = target_xy.shape[:2]
    mask = torch.zeros(B, T, g, g, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            x, y = int(target_xy[b, t, 0]), int(target_xy[b, t, 1])
            x0, y0 = x // patch_size, y // patch_size
            x1, y1 = (x + target_size - 1) // patch_size, (y + target_size - 1) // patch_size
            mask[b, t, y0:y1 + 1, x0:x1 + 1] = True
    return mask.view(B, T, g * g)


def fov_target_mass(maps, target_patches):
    """(B, T) attention mass on the target's patches. maps (B, T, N); target_patches (B, T, N) bool."""
    return (maps.float() * target_patches.to(maps.device)).sum(-1)


def fov_look_loss(maps, target_patches):
    """-log of the attention mass on the target's patches, averaged over frames 1.. (frame 0's fine query has no
    history to predict from): the look loss (look_weight)."""
    return -(fov_target_mass(maps, target_patches)[:, 1:] + 1e-6).log().mean()


def fov_advantage(reward):
    """REINFORCE's advantage (B, T): each frame's reward against its batch mean, over its batch spread (a reward's
    scale never sets the step size)."""
    return (reward - reward.mean(0)) / (reward.std(0) + 1e-6)


def fov_target_hit(maps, target_xy, target_size, image_size, patch_size):
    """Share of attention mass on the patches the target overlaps. maps (B, T, N); target_xy (B, T, 2)."""
    return float(fov_target_mass(maps, fov_target_patches(target_xy, target_size, image_size, patch_size)).mean())

# -----------------------------------------------------------------------------
# drawing


def fov_heat(frame, att, scale=4):
    """frame (3, H, W) in [0, 1], att (N,) over a square patch grid -> (3, H*scale, W*scale) overlay."""
    H = frame.shape[-1]
    g = int(round(att.numel() ** 0.5))
    a = att.float().view(1, 1, g, g)
    a = a / a.max().clamp_min(1e-12)
    a = F.interpolate(a, size=(H * scale, H * scale), mode="nearest")[0]
    big = F.interpolate(frame[None].float(), scale_factor=scale, mode="nearest")[0]
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    return (0.45 * big + 0.55 * a * red + 0.25 * (1 - a) * big).clamp(0, 1)


def fov_attention_strip(frames, coarse, fine, scale=4, pad=2):
    """One video: rows = frames, coarse attention, fine attention; frames (T, 3, H, W), maps (T, N).
    -> (3, rows*h, T*w) image tensor in [0, 1]."""
    T, _, H, W = frames.shape
    h, w = H * scale + pad, W * scale + pad
    out = torch.ones(3, 3 * h, T * w)
    for t in range(T):
        big = F.interpolate(frames[t:t + 1].float(), scale_factor=scale, mode="nearest")[0]
        for r, img in enumerate((big, fov_heat(frames[t], coarse[t], scale), fov_heat(frames[t], fine[t], scale))):
            out[:, r * h:r * h + H * scale, t * w:t * w + W * scale] = img
    return out


def fov_pick_mode(seed, step, weights, modes=("video", "text", "caption")):
    """The training mode of a whole batch (never per sample: a mixed batch broke training), a pure function of
    (seed, step), so resume and every DDP rank agree."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(modes),) or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"mode_weights must be {len(modes)} non-negative numbers with a positive sum, one per "
                         f"mode {modes}, got {weights}")
    return modes[int(np.random.default_rng([seed, 7, step]).choice(len(modes), p=w / w.sum()))]

# -----------------------------------------------------------------------------
# config and input checks (at startup, before a run dir exists)


def fov_check_config(c, tasks=FOV_TASKS + ("folder",)):
    """Every bad setting of train_foveated.py's config c as one InputError, before anything runs."""
    folder = c["task"] == "folder"
    checks = [(c["task"] not in tasks, f"task must be one of {tasks}, got {c['task']!r}"),
              (c["query_mode"] not in ("deep", "shallow"),
               f"query_mode must be 'deep' or 'shallow', got {c['query_mode']!r}"),
              (c["n_passes"] < 1, f"n_passes must be >= 1, got {c['n_passes']}"),
              (folder and c["oracle_look"], "oracle_look=True needs the synthetic generator's target positions "
               "(task='track' or 'static_large')"),
              (folder and c["look_weight"] > 0, "look_weight > 0 needs the synthetic generator's target positions; "
               "set look_weight=0 for task='folder'"),
              (folder and c["latent_target"] == "target_layer", "latent_target='target_layer' needs the synthetic "
               "generator's target layer; real clips (task='folder') take 'delta' or 'frame'"),
              (c["recurrent"] and c["n_passes"] > 1, "recurrent=True is one fine pass whose queries come from its "
               f"own state (the fixed point of n_passes); set n_passes=1, got {c['n_passes']}"),
              (folder and not c["data_dir"],
               "task='folder' needs data_dir=<folder with captions.json and clips>"),
              (c["latent_target"] not in ("target_layer", "delta", "frame"),
               f"latent_target must be 'target_layer', 'delta' or 'frame', got {c['latent_target']!r}"),
              (c["image_size"] % c["patch_size"] != 0,
               f"image_size {c['image_size']} is not a multiple of patch_size {c['patch_size']}"),
              # position t predicts frame t+1: one frame leaves nothing to predict
              (c["n_frames"] < 2, f"n_frames must be >= 2 (each frame predicts the next), got {c['n_frames']}"),
              (c["latent_grid"] < 1 or c["latent_channels"] < 1,  # an empty latent: a NaN loss
               f"latent_grid and latent_channels must be >= 1, got {c['latent_grid']} and {c['latent_channels']}"),
              # the attention strip draws held-out videos 0..n_vis-1 of the eval
              (c["n_eval"] < 1 or not 0 <= c["n_vis"] <= c["n_eval"],
               f"need n_eval >= 1 and 0 <= n_vis <= n_eval, got n_eval={c['n_eval']}, n_vis={c['n_vis']}"),
              (c["read_top_k"] < 0, f"read_top_k must be >= 0 (0: soft reads of every patch), got {c['read_top_k']}"),
              (c["read_gumbel"] and not c["read_top_k"], "read_gumbel=True draws the read_top_k patches: set read_top_k"),
              (c["reinforce_weight"] > 0 and not (c["read_top_k"] and c["read_gumbel"]), "reinforce_weight > 0 "
               "rewards drawn glimpses: set read_top_k > 0 and read_gumbel=True"),
              (c["freeze_vit"] and not c["vit_init"] and c["init_from"] == "scratch", "freeze_vit=True needs "
               "vit_init=<a pretrained ViT: checkpoint dir, or a transformers encoder>: a frozen random ViT would never learn to see")]
    for bad, msg in checks:
        if bad:
            raise InputError(msg)
    fov_pick_mode(c["seed"], 0, c["mode_weights"])  # bad mode_weights fail here, not at the first step


def fov_check_captions(named, tok, caption_tokens):
    """Every caption the run can draw fits caption_tokens: checked once at startup, not when a batch first draws
    it (mid-run). named: (where, caption) pairs."""
    for where, caption in named:
        if not isinstance(caption, str):
            raise InputError(f"{where}: caption must be a string, got {caption!r}")
        n = len(tok.encode(caption))
        if n > caption_tokens:
            raise InputError(f"{where}: caption of {n} tokens exceeds caption_tokens={caption_tokens}: {caption!r}")


def fov_load_vit_init(vit, vit_init):
    """A pretrained ViT's 'vit.*' weights from the checkpoint vit_init into vit, or one line naming what does not
    fit (load_state_dict's error lists every tensor)."""
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

# -----------------------------------------------------------------------------
# the ViT's input and its K/V cache


def fov_coord_planes(size, n_freq=2):
    """Fixed (4 * n_freq, size, size) sin/cos planes of x and y: patch keys carry their position."""
    r = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    planes = [f(math.pi * (2 ** k) * c) for c in (xx, yy) for k in range(n_freq) for f in (torch.sin, torch.cos)]
    return torch.stack(planes)


def fov_vit_input(frames, coords=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """frames (B, T, 3, H, W) in [0, 1] -> (B*T, C, H, W): RGB normalised as the ViT expects (its config's
    mean/std), then the coordinate planes if given."""
    x = normalize(frames.flatten(0, 1), mean, std)
    if coords is not None:
        x = torch.cat([x, coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1)
    return x


def fov_check_cache(cache, query_mode):
    """A cache built for one layout and read in the other is one clear error (not a KeyError deep in a loop);
    every path (training, captioning, generation) reads through FoveatedVLM.read()."""
    kv = cache.get("kv") if isinstance(cache, dict) else None
    if not kv or kv[-1] is None:
        raise InputError("frame cache has no last-layer K/V: build it with FoveatedVLM.encode()")
    if query_mode == "deep" and any(layer is None for layer in kv):
        raise InputError("deep query mode needs the K/V of every layer but this cache is the shallow layout")

# -----------------------------------------------------------------------------
# eval metrics


def fov_metrics(a, image_size, patch_size, target_size=0, read_head=None, glimpse_maps=None):
    """The eval's metrics from the held-out outputs a (concatenated over batches: pf/pc the fine/coarse
    predictions, tg their targets, all every frame's latent, zf/zc the reads, af/ac the attention maps, xy the
    target's positions when known). read_head: (weight, bias) of the read head (read_weight > 0);
    glimpse_maps: {path: location maps} (glimpse=True). -> (metrics, per-frame losses)."""
    lf, lc = F.mse_loss(a["pf"], a["tg"]).item(), F.mse_loss(a["pc"], a["tg"]).item()
    ent_f, max_f = fov_attention_stats(a["af"])
    ent_c, max_c = fov_attention_stats(a["ac"])
    # loss_mean: predicting the training mean (0 after standardisation); a path above it has not learned at all
    # loss_copy: predicting frame t+1 as frame t's true latent ("as it looks now", known exactly): a reference
    m = dict(ratio=lc / max(lf, 1e-12), loss_fine=lf, loss_coarse=lc, loss_mean=(a["tg"] ** 2).mean().item(),
             loss_copy=F.mse_loss(a["all"][:, :-1], a["tg"]).item(), entropy_fine=ent_f, entropy_coarse=ent_c,
             entropy_gap=ent_c - ent_f, max_att_fine=max_f, max_att_coarse=max_c,
             cos_z_fine_coarse=fov_cosine(a["zf"], a["zc"]))
    per_frame = dict(fine=fov_per_frame_mse(a["pf"], a["tg"]), coarse=fov_per_frame_mse(a["pc"], a["tg"]),
                     copy=fov_per_frame_mse(a["all"][:, :-1], a["tg"]))
    if read_head is not None:  # how much of its own frame's latent each path's reads hold, per frame too: where
        # the track is lost (frames 0..T-1, where the losses above are the predictions of 1..T-1)
        for path, z in (("fine", a["zf"]), ("coarse", a["zc"])):
            read = F.linear(z, *read_head)
            m[f"loss_read_{path}"] = F.mse_loss(read, a["all"]).item()
            per_frame[f"read_{path}"] = fov_per_frame_mse(read, a["all"])
    if "xy" in a:  # attention mass on the target's patches (frames 1.. : frame 0 has no history)
        on_target = fov_target_patches(a["xy"][:, 1:], target_size, image_size, patch_size)
        for path, maps in (("fine", a["af"]), ("coarse", a["ac"])):
            m[f"target_att_{path}"] = float(fov_target_mass(maps[:, 1:], on_target).mean())
            # the share of frames whose attention peak lands on one of the target's patches (uniform: ~1/N)
            m[f"target_peak_{path}"] = on_target.gather(-1, maps[:, 1:].argmax(-1, keepdim=True)).float().mean().item()
        for path, g in (glimpse_maps or {}).items():  # the location maps' mass on the target (uniform: ~1/N)
            m[f"glimpse_target_{path}"] = float(fov_target_mass(g, on_target).mean())
    return m, per_frame


def fov_caption_scores(generated, truth):
    """Exact-match rate and word accuracy (position by position; a missing or extra word counts wrong)."""
    exact = float(np.mean([g == c for g, c in zip(generated, truth)]))
    words = float(np.mean([np.mean([x == y for x, y in zip(g.split(), c.split())] +
                                   [False] * abs(len(g.split()) - len(c.split())))
                           for g, c in zip(generated, truth)]))
    return dict(caption_exact=exact, caption_word_acc=words)


def fov_save_attention(frames, coarse, fine, path):
    """The attention PNG: per video (frames (V, T, 3, H, W), maps (V, T, N)) a strip of the frames, the coarse and
    the fine attention; the videos side by side. -> path."""
    strips = [fov_attention_strip(frames[i].cpu(), coarse[i], fine[i]) for i in range(len(frames))]
    return save_png(torch.cat(strips, 1), path)
