"""
Everything about data in and answers out: tokenizer, image I/O, seeded batching with DDP sharding,
results.json, and (below the foundations) one synthetic generator, real readers and metrics per recipe.
"""
import functools
import json
import os
import subprocess

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# tokenizer: byte-level tiktoken built offline + named special tokens, addressed by id


class Tokenizer:
    """Byte-level tiktoken encoding (256 byte ranks) plus named special tokens with ids 256, 257, ...

    Special tokens are only ever inserted by id (`tok["<|image|>"]`); encode() never turns text that
    happens to spell a special token into that token. base='gpt2' (or another tiktoken name) uses a named
    BPE when it is available offline; the specials are then appended after its vocabulary."""

    BASE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|image|>")

    def __init__(self, specials=(), base="bytes"):
        import tiktoken
        names = list(dict.fromkeys(self.BASE_SPECIALS + tuple(specials)))
        if base == "bytes":
            ranks = {bytes([i]): i for i in range(256)}
            pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        else:
            try:
                named = tiktoken.get_encoding(base)
            except Exception as e:  # tiktoken downloads named encodings; offline that fails
                from model import InputError
                raise InputError(f"tiktoken encoding '{base}' is not available offline ({e}); use base='bytes'") from None
            ranks, pat = named._mergeable_ranks, named._pat_str
        self.build(base, pat, ranks, {name: len(ranks) + i for i, name in enumerate(names)})

    @classmethod
    def from_ranks(cls, name, pat_str, mergeable_ranks, special_tokens):
        """A tokenizer from a tiktoken Encoding's parts (e.g. nanochat's tokenizer.pkl, unpickled by pretrained.py)."""
        tok = cls.__new__(cls)
        tok.build(name, pat_str, mergeable_ranks, dict(special_tokens))
        return tok

    def build(self, name, pat_str, ranks, special):
        import tiktoken
        self.base, self.pat_str, self.ranks, self.special = name, pat_str, ranks, special
        self.enc = tiktoken.Encoding(name=f"{name}+{len(special)}specials", pat_str=pat_str,
                                     mergeable_ranks=ranks, special_tokens=special)
        self.n_base = len(ranks)
        self.vocab_size = max([self.n_base - 1, *special.values()]) + 1

    @property
    def bos(self):
        """The id that starts a document (None if this vocabulary has none)."""
        return self.special.get("<|bos|>")

    def add_specials(self, names):
        """Appends the special tokens of `names` not already here, with the next free ids. -> every name's id."""
        new = [n for n in dict.fromkeys(names) if n not in self.special]
        special = dict(self.special, **{n: self.vocab_size + i for i, n in enumerate(new)})
        self.build(self.base, self.pat_str, self.ranks, special)
        return [self.special[n] for n in names]

    def __getitem__(self, name):
        return self.special[name]

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids, skip_special=True):
        ids = [int(i) for i in ids if not (skip_special and int(i) >= self.n_base)]
        return self.enc.decode(ids, errors="replace")

def read_json(path, what):
    """The parsed JSON of an annotation file; a missing file or bad JSON is a one-line error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            from model import InputError
            raise InputError(f"{path}: not valid JSON ({e})") from None

# -----------------------------------------------------------------------------
# image I/O (Pillow)


def load_image(path, size=None):
    """-> float tensor (3, H, W) in [0, 1]. size: int (square) or (W, H)."""
    from PIL import Image
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    img = Image.open(path).convert("RGB")
    if size is not None:
        img = img.resize((size, size) if isinstance(size, int) else tuple(size), Image.BILINEAR)
    return pil_to_tensor(img)


def pil_to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_pil(x):
    """(3, H, W) or (H, W) float tensor in [0, 1], or a uint8 HWC array -> PIL image."""
    from PIL import Image
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        x = (x.clamp(0, 1) * 255).round().byte()
        x = x.permute(1, 2, 0).numpy() if x.dim() == 3 else x.numpy()
    x = np.asarray(x)
    if x.ndim == 2:
        x = np.stack([x] * 3, -1)
    return Image.fromarray(x.astype(np.uint8)).convert("RGB")


def normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def oriented_edges(images):
    """(B, C, H, W) -> (B, 4, H, W): |oriented Sobel| (x, y and the two diagonals), the max over colour. Extra
    input channels for a linear patch embedding: summed over a patch they are an orientation histogram (a
    square's energy in x and y, a diamond's on the diagonals, a circle's in all four), which from raw pixels
    it can only learn position by position, slowly."""
    k = torch.tensor([[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
                      [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
                      [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],
                      [[-2, -1, 0], [-1, 0, 1], [0, 1, 2]]], dtype=images.dtype, device=images.device) / 4
    B, C, H, W = images.shape
    flat = F.pad(images.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate")  # no phantom edge at the border
    g = F.conv2d(flat, k[:, None]).abs()
    return g.reshape(B, C, 4, H, W).amax(1)


def save_png(img, path):
    """Write an image (tensor, array or PIL) as PNG, creating the folder; written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    to_pil(img).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def image_grid(images, cols):
    """List of PIL images (same size) -> one PIL image, `cols` per row."""
    from PIL import Image
    images = [to_pil(im) for im in images]
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid

# -----------------------------------------------------------------------------
# seeded batching: every sample is a pure function of (seed, split, index)


SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "probe": 3}


def sample_rng(seed, split, index):
    """The RNG of one sample. Train and val draw from disjoint streams, so the held-out split is fixed by
    the seed and can never overlap training; resume is exact because index is a function of the step."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IDS)}")
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def batch_indices(step, batch_size, rank=0, world_size=1):
    """Global sample indices of this rank's share of step `step`'s global batch (batch_size per rank).
    The union over ranks equals one process's batch of batch_size * world_size: DDP sees the same data."""
    start = step * batch_size * world_size + rank * batch_size
    return list(range(start, start + batch_size))


class _StepBatches(torch.utils.data.Dataset):
    def __init__(self, make_batch):
        self.make_batch = make_batch

    def __getitem__(self, step):
        return self.make_batch(step)


def step_batches(make_batch, start, stop, num_workers=0, pin_memory=False):
    """make_batch(start), make_batch(start + 1), ... in order. num_workers > 0 builds them in worker processes
    (a DataLoader, forked so the script's own functions need no pickling) while the model trains on the
    previous ones; make_batch stays a pure function of the step, so a resumed run sees the same batches."""
    if num_workers == 0:
        return (make_batch(s) for s in range(start, stop))
    return iter(torch.utils.data.DataLoader(_StepBatches(make_batch), batch_size=None, sampler=range(start, stop),
                                            num_workers=num_workers, prefetch_factor=2, pin_memory=pin_memory,
                                            multiprocessing_context="fork"))


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    """Shuffled order of a finite dataset for one epoch, the same on every rank (a tuple: cached, because the
    scripts ask for it once per sample, and a 1M-record permutation takes ~50 ms)."""
    return tuple(np.random.default_rng([seed, epoch]).permutation(n).tolist())

# -----------------------------------------------------------------------------
# results.json: one shape for every recipe


def target_met(value, op, threshold):
    return {">=": value >= threshold, "<=": value <= threshold, ">": value > threshold,
            "<": value < threshold}[op]


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(out_dir, recipe, split, n_eval, metrics, targets, **fields):
    """Writes out_dir/results.json: {"recipe", "split", "n_eval", "metrics", "targets", "met", ...fields}.
    targets: {metric: (op, threshold)}; "met" is True only if every target metric is present and met."""
    met = all(k in metrics and target_met(metrics[k], op, thr) for k, (op, thr) in targets.items())
    results = dict(recipe=recipe, split=split, n_eval=n_eval,
                   metrics={k: float(v) for k, v in metrics.items()},
                   targets={k: [op, thr] for k, (op, thr) in targets.items()},
                   met=met, **{"git": git_commit(), **fields})  # fields may name the commit a run started from
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return results


def format_metrics(metrics, targets=None):
    """'name 0.962 (>= 0.95 ok)' pairs on one line, for the eval print."""
    parts = []
    for k, v in metrics.items():
        s = f"{k} {v:.4g}"
        if targets and k in targets:
            op, thr = targets[k]
            s += f" ({op} {thr} {'ok' if target_met(v, op, thr) else 'MISS'})"
        parts.append(s)
    return " | ".join(parts)
