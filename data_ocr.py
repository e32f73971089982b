"""
train_ocr.py's own code (shared helpers live in data.py and model.py): synthetic documents rendered with Pillow's
bundled font, readers for JSONL / Fox / OmniDocBench annotations, the OCR metrics, drawing, the collapse monitor,
and the model: DeepEncoder + GPT, its builders from checkpoints and its FLOP count.

Held-out text is never seen in training: every whitespace-separated word (letters, numbers, prices)
belongs to exactly one split by a hash of its characters (`ocr_word_split`), so a val image can only be
read by reading its characters, not by recalling a memorised word.
"""
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import dataclass_from_dict, load_checkpoint, load_meta
from data import pil_to_tensor, read_json, sample_rng, save_png, to_pil
from model import GPT, GPTConfig, InputError, Projector, ViT, ViTConfig, embed_patches, gpt_flops_per_token

OCR_LETTERS = "abcdefghijklmnopqrstuvwxyz"
OCR_DIGITS = "0123456789"
OCR_STYLES = ("paragraph", "receipt", "label")
OCR_VAL_EVERY = 5  # one word in 5 (by hash) is reserved for the held-out split

# -----------------------------------------------------------------------------
# synthetic documents


def ocr_font(size):
    """Pillow's bundled font (Aileron Regular via FreeType, Pillow >= 10.1): offline, any size.
    Without FreeType load_default() falls back to a fixed ~6x11 bitmap font whatever the size."""
    from PIL import ImageFont
    cache = ocr_font.__dict__.setdefault("cache", {})
    if size not in cache:
        try:
            cache[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: no size argument, bitmap font only
            cache[size] = ImageFont.load_default()
    return cache[size]


def ocr_word_split(word):
    """'val' or 'train': which split may use this word (a pure function of its characters)."""
    return "val" if zlib.crc32(word.encode()) % OCR_VAL_EVERY == 0 else "train"


def ocr_random_word(rng, split, kind="word"):
    """A word (letters), number, price or percent that belongs to `split` (rejection sampling)."""
    want = "val" if split == "val" else "train"
    while True:
        if kind == "word":
            w = "".join(rng.choice(list(OCR_LETTERS), size=int(rng.integers(2, 7))))
        elif kind == "price":
            w = f"{int(rng.integers(0, 100))}.{int(rng.integers(0, 100)):02d}"
        elif kind == "percent":
            w = f"{int(rng.integers(0, 100))}%"
        else:  # plain number
            w = "".join(rng.choice(list(OCR_DIGITS), size=int(rng.integers(1, 5))))
        if ocr_word_split(w) == want:
            return w


def ocr_word_gap(font):
    """Inter-word gap in pixels: a space plus 2 px, so word breaks stay visible at 10 px font sizes."""
    return font.getlength(" ") + 2


def ocr_line_width(font, line, pitch=0):
    if pitch:
        return pitch * len(line)
    words = line.split(" ")
    return sum(font.getlength(w) for w in words) + ocr_word_gap(font) * (len(words) - 1)


def ocr_layout_text(rng, split, style, font, width, max_lines, pitch=0, min_lines=1, line_chars=0):
    """min_lines..max_lines lines of text (each fits in `width` pixels, and in line_chars characters if > 0) for
    one document style."""
    def fits(s):
        return ocr_line_width(font, s, pitch) <= width and (not line_chars or len(s) <= line_chars)

    lines = []
    n_lines = int(rng.integers(min(min_lines, max_lines), max_lines + 1))
    for _ in range(n_lines):
        if style == "receipt":  # "item price": the price right-aligned when drawn
            item, price = ocr_random_word(rng, split), ocr_random_word(rng, split, "price")
            line = f"{item} {price}"
        elif style == "label":  # chart label: "name: 42" or "name 17%"
            name = ocr_random_word(rng, split)
            value = ocr_random_word(rng, split, "percent" if rng.random() < 0.5 else "number")
            line = f"{name}: {value}" if rng.random() < 0.5 else f"{name} {value}"
        else:  # paragraph: words (and the odd number) wrapped to the width
            line = ocr_random_word(rng, split)
            for _ in range(6):
                kind = "number" if rng.random() < 0.15 else "word"
                nxt = line + " " + ocr_random_word(rng, split, kind)
                if not fits(nxt):
                    break
                line = nxt
        while not fits(line) and " " in line:  # too wide: drop words from the end
            line = line.rsplit(" ", 1)[0]
        if fits(line):
            lines.append(line)
    return lines or [ocr_random_word(rng, split)[:4]]


def page_wh(image_size):
    """A page size given as an int (square) or (width, height) -> (width, height)."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def ocr_render(lines, image_size, font_size, x0, y0, line_gap, ink, paper, right_align_last_word=False, pitch=0):
    """Lines -> grayscale-on-RGB PIL image (image_size: int, square, or (width, height)). pitch > 0: typewriter
    layout, one character per `pitch` px cell."""
    from PIL import Image, ImageDraw
    width = page_wh(image_size)[0]
    img = Image.new("L", page_wh(image_size), int(paper))
    draw = ImageDraw.Draw(img)
    font = ocr_font(font_size)
    for i, line in enumerate(lines):
        y = y0 + i * line_gap
        if pitch:
            for j, ch in enumerate(line):
                draw.text((x0 + j * pitch + (pitch - font.getlength(ch)) / 2, y), ch, font=font, fill=int(ink))
            continue
        words, x = line.split(" "), x0
        for j, word in enumerate(words):
            if right_align_last_word and j == len(words) - 1 and j > 0:
                x = max(x, width - 2 - font.getlength(word))
            draw.text((x, y), word, font=font, fill=int(ink))
            x += font.getlength(word) + ocr_word_gap(font)
    return img.convert("RGB")


OCR_GLYPH_CLASSES = 95  # 0 = background (and space), 1..94 = printable ASCII '!'..'~'
OCR_TOKEN_SLOTS = 3     # characters a vision token is asked to carry (16 px tokens, 7 px pitch: 2-3 per token)


def ocr_parse_layout(text):
    """'6x16' -> (6 lines, 16 characters a line)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"a page layout is LINESxCHARS, e.g. '6x16', got {text!r}")
    return int(parts[0]), int(parts[1])


def ocr_page_layout(page, lines, chars):
    """The typewriter layout that fills a page (int: square, or (width, height)) with `lines` lines of `chars`
    characters: dict(pitch, line_gap, font_size), the font about 1.5 pitches (as the recipe's 10-11 px on 7 px)."""
    w, h = page_wh(page)
    pitch, line_gap = (w - 4) // chars, (h - 4) // lines
    if pitch < 2 or line_gap < 4:
        raise InputError(f"{lines}x{chars} does not fit a {w} x {h} page (pitch {pitch} px, line gap {line_gap} px)")
    return dict(pitch=pitch, line_gap=line_gap, font_size=max(4, min(line_gap - 2, round(1.5 * pitch))))


def ocr_glyph_labels(lines, image_size, patch, x0, y0, line_gap, font_size, pitch):
    """Which character each patch of a typewriter page shows: (Gh, Gw) int64, G = side // patch (image_size: int
    or (width, height)), raster order like the SAM tokens. A patch whose centre lies in character j's cell of
    line i (x in [x0 + j*pitch, x0 + (j+1)*pitch), y in [y0 + i*line_gap, y0 + i*line_gap + font_size + 2)) gets
    ord(ch) - 32; background and spaces 0; characters outside printable ASCII -1 (ignored)."""
    w, h = page_wh(image_size)
    out = np.zeros((h // patch, w // patch), dtype=np.int64)
    x_centres, y_centres = (np.arange(w // patch) + 0.5) * patch, (np.arange(h // patch) + 0.5) * patch
    for i, line in enumerate(lines):
        top = y0 + i * line_gap
        rows = (y_centres >= top) & (y_centres < top + font_size + 2)
        for j, ch in enumerate(line):
            cols = (x_centres >= x0 + j * pitch) & (x_centres < x0 + (j + 1) * pitch)
            code = ord(ch) - 32
            out[np.ix_(rows, cols)] = code if 0 <= code < OCR_GLYPH_CLASSES else -1
    return out


def ocr_slot_labels(lines, image_size, token_px, slots, x0, y0, line_gap, font_size, pitch):
    """Which characters each vision token must carry, left to right: (qh, qw, slots) int64, q = side // token_px
    (image_size: int or (width, height)). Line i belongs to the token row holding its vertical centre; character
    j, centred at x, to
    token column x // token_px and slot floor(slots * (x % token_px) / token_px). Empty slots and spaces 0,
    characters outside printable ASCII (or two in one slot: pitch < token_px / slots) -1 (ignored)."""
    w, h = page_wh(image_size)
    out = np.zeros((h // token_px, w // token_px, slots), dtype=np.int64)
    for i, line in enumerate(lines):
        r = int((y0 + i * line_gap + (font_size + 2) / 2) // token_px)
        for j, ch in enumerate(line):
            x = x0 + (j + 0.5) * pitch
            c, k = int(x // token_px), int(slots * (x % token_px) / token_px)
            if not (0 <= r < out.shape[0] and 0 <= c < out.shape[1]):
                continue
            code = ord(ch) - 32
            taken = out[r, c, k] != 0
            out[r, c, k] = code if 0 <= code < OCR_GLYPH_CLASSES and not taken else -1
    return out


def ocr_synthetic_sample(seed, split, index, image_size=64, font_sizes=(10, 11, 12), max_lines=3,
                         noise=0.04, styles=OCR_STYLES, paper=(200, 255), ink=(0, 90), pitch=0, line_gap=0,
                         glyph_patch=0, page=None, min_lines=1, line_chars=0):
    """One synthetic document: a pure function of (seed, split, index). page (width, height): a page of that
    size (default image_size x image_size; larger pages are what tiling reads). min_lines..max_lines lines (as many
    as fit), of at most line_chars characters (0: as many as fit). pitch > 0: typewriter layout
    (fixed-pitch cells); line_gap > 0: lines on a fixed grid (y jitter of 2 px) instead of anywhere.
    glyph_patch > 0 (needs pitch): also 'glyphs', the character under every patch (ocr_glyph_labels), and
    'slots', the characters each vision token covers (ocr_slot_labels, tokens of 4 * glyph_patch px, 3 slots).
    -> dict(image float (3, H, W) in [0, 1], text 'line\\nline', style, id[, glyphs, slots])."""
    rng = sample_rng(seed, split, index)
    width, height = page or (image_size, image_size)
    style = styles[int(rng.integers(len(styles)))]
    font_size = int(rng.choice(font_sizes))
    font = ocr_font(font_size)
    grid = line_gap > 0
    line_gap = line_gap or font_size + 2 + int(rng.integers(0, 3))
    fit_lines = max(1, min(max_lines, (height - 4) // line_gap))
    x0 = int(rng.integers(1, 4 if pitch else 6))
    lines = ocr_layout_text(rng, split, style, font, width - x0 - 1, fit_lines, pitch, min_lines, line_chars)
    y_room = height - 2 - line_gap * len(lines)
    y0 = int(rng.integers(0, 3)) if grid else int(rng.integers(-1, max(0, y_room) + 1))
    paper_level, ink_level = rng.uniform(*paper), rng.uniform(*ink)
    img = ocr_render(lines, (width, height), font_size, x0, y0, line_gap, ink_level, paper_level, style == "receipt",
                     pitch)
    x = pil_to_tensor(img)
    if noise > 0:  # sensor noise, its strength drawn per image
        x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, noise), x.shape[1:]).astype(np.float32))
        x = x.clamp(0, 1)
    out = dict(image=x, text="\n".join(lines), style=style, id=f"{split}_{index}")
    if glyph_patch and pitch:
        out["glyphs"] = ocr_glyph_labels(lines, (width, height), glyph_patch, x0, y0, line_gap, font_size, pitch)
        out["slots"] = ocr_slot_labels(lines, (width, height), 4 * glyph_patch, OCR_TOKEN_SLOTS, x0, y0, line_gap,
                                       font_size, pitch)
    return out


def ocr_probe_images(image_size=64, seed=0):
    """The fixed collapse-monitor probe set: noise, white, black, a text page. -> (names, (4, 3, S, S))."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(3, image_size, image_size, generator=g)
    white, black = torch.ones(3, image_size, image_size), torch.zeros(3, image_size, image_size)
    text = ocr_synthetic_sample(seed, "probe", 0, image_size, noise=0.0)["image"]
    return ["noise", "white", "black", "text"], torch.stack([noise, white, black, text])

# -----------------------------------------------------------------------------
# tiling (DeepSeek-OCR's crop mode, "Gundam"): a global view of the whole page plus local crops chosen by its
# aspect ratio


def ocr_crop_grid(width, height, crop_size, min_crops=2, max_crops=9):
    """(n_w, n_h): the crop_size tiles across and down that a width x height page is cut into, by DeepSeek-OCR's
    rule (its dynamic_preprocess and find_closest_aspect_ratio, from InternVL): (1, 1), no crops, when the page
    fits one crop; else, of the grids of min_crops..max_crops tiles (fewest tiles first), the one whose aspect
    ratio is nearest the page's, a later grid winning a tie when the page has over half its pixels."""
    if width <= crop_size and height <= crop_size:
        return 1, 1
    # the same set built in the same order as theirs: equal-sized grids are then visited (and tie) as there
    grids = sorted({(i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_crops <= i * j <= max_crops}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for n_w, n_h in grids:
        diff = abs(width / height - n_w / n_h)
        if diff < best_diff or diff == best_diff and width * height > 0.5 * crop_size * crop_size * n_w * n_h:
            best, best_diff = (n_w, n_h), diff
    return best


def ocr_tile_views(page, image_size, crop_size, min_crops=2, max_crops=9, fill=(0.5, 0.5, 0.5)):
    """A page (3, H, W) in [0, 1] -> (global view (3, S, S), crops (n_w * n_h or 0, 3, C, C) in raster order,
    (n_w, n_h)), as DeepSeek-OCR's crop mode: the global view is the page scaled to fit image_size and centred on
    `fill` (PIL's ImageOps.pad), the crops are the page resized to n_w*C x n_h*C (cut as is when it has that size)
    and cut into C x C tiles."""
    from PIL import Image, ImageOps
    h, w = page.shape[1:]
    n_w, n_h = ocr_crop_grid(w, h, crop_size, min_crops, max_crops)
    img = to_pil(page)
    view = page if (w, h) == (image_size, image_size) else \
        pil_to_tensor(ImageOps.pad(img, (image_size, image_size), color=tuple(int(255 * f) for f in fill)))
    if n_w * n_h == 1:
        return view, torch.zeros(0, 3, crop_size, crop_size), (1, 1)
    if (w, h) != (n_w * crop_size, n_h * crop_size):
        page = pil_to_tensor(img.resize((n_w * crop_size, n_h * crop_size), Image.BICUBIC))
    crops = page.view(3, n_h, crop_size, n_w, crop_size).permute(1, 3, 0, 2, 4).reshape(-1, 3, crop_size, crop_size)
    return view, crops, (n_w, n_h)


def ocr_tile_sample(sample, image_size, crop_size, min_crops=2, max_crops=9, fill=(0.5, 0.5, 0.5)):
    """A sample of a whole page -> the same with image = its global view, crops and grid (ocr_tile_views). Its
    glyph and slot labels become per view, the global view first, then the crops: (1 + crops, cells, cells[,
    slots]). The crops' are cut from the page's (when the page was cut unresized into crops of image_size); the
    global view, scaled, has none (-1) unless it is the page itself. Labels that do not fit are dropped."""
    h, w = sample["image"].shape[1:]
    view, crops, grid = ocr_tile_views(sample["image"], image_size, crop_size, min_crops, max_crops, fill)
    out = dict(sample, image=view, crops=crops, grid=grid)
    for k in [k for k in ("glyphs", "slots") if k in out]:
        labels = out.pop(k)
        cells = image_size // (w // labels.shape[1])  # cells per view side
        glob = labels[None] if (w, h) == (image_size, image_size) else np.full((1, cells, cells) + labels.shape[2:], -1)
        if grid == (1, 1):
            out[k] = glob
        elif crop_size == image_size and (w, h) == (grid[0] * crop_size, grid[1] * crop_size):
            cut = labels.reshape(grid[1], cells, grid[0], cells, *labels.shape[2:]).swapaxes(1, 2)
            out[k] = np.concatenate([glob, cut.reshape(-1, cells, cells, *labels.shape[2:])])
    return out

# -----------------------------------------------------------------------------
# real data readers: every reader yields dict(image=<path>, text=<str>, id=<str>), and fails at load time, naming
# the file and the record, on a bad record or a missing image (not in the first eval after hours of training)


def ocr_check_images(items, path):
    """Every item's image must exist: the first missing one is named, with how many are missing."""
    missing = [it["image"] for it in items if not os.path.isfile(it["image"])]
    if missing:
        raise InputError(f"{path}: {len(missing)} of {len(items)} images not found, the first: {missing[0]} "
                         f"(set image_root to the folder that holds them)")
    return items


def ocr_read_jsonl(path, image_root=None):
    """JSONL, one {"image": path, "text": str} per line; relative image paths are relative to image_root
    (default: the file's folder)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"OCR jsonl not found: {path}")
    root, items = image_root or os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n + 1}: not valid JSON ({e})") from None
            if not (isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("text"), str)):
                raise InputError(f"{path}:{n + 1}: expected a JSON object with 'image' and 'text' strings")
            items.append(dict(image=os.path.join(root, row["image"]), text=row["text"], id=str(row.get("id", n))))
    return ocr_check_images(items, path)


def ocr_read_fox(path, image_root=None):
    """Fox benchmark annotations (LLaVA-style JSON list): [{"image": "x.png", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": <page text>}]}, ...].
    Images resolve against image_root (default: the JSON's folder; the official release keeps them in
    en_pdf_png/ beside en_page_ocr.json)."""
    rows = read_json(path, "Fox annotation file")
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of Fox entries, got {type(rows).__name__}")
    root, items = image_root or os.path.dirname(os.path.abspath(path)), []
    for n, row in enumerate(rows):
        convs = row.get("conversations") if isinstance(row, dict) else None
        answers = [c.get("value") for c in convs if isinstance(c, dict) and c.get("from") == "gpt"] \
            if isinstance(convs, list) else []
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not answers \
                or not isinstance(answers[0], str):
            raise InputError(f"{path}: entry {n} needs an 'image' string and a gpt answer string in 'conversations'")
        items.append(dict(image=os.path.join(root, row["image"]), text=answers[0], id=str(row.get("id", row["image"]))))
    return ocr_check_images(items, path)


# OmniDocBench's text categories: the ground-truth list its end-to-end text evaluation reads (GT_CATEGORY_LIST in
# its end2end dataset code); tables, formulas (equation_isolated) and figures are scored separately there
OMNIDOC_TEXT_CATEGORIES = ("text_block", "title", "code_txt", "code_txt_caption", "reference", "equation_caption",
                           "figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
                           "code_algorithm_caption", "header", "footer", "page_footnote", "page_number")


def ocr_read_omnidocbench(path, image_root=None, categories=OMNIDOC_TEXT_CATEGORIES):
    """OmniDocBench.json: a list of pages {"layout_dets": [{"category_type", "order", "text", "ignore"}, ...],
    "page_info": {"image_path": ...}}. Page text = the text blocks of `categories` in reading order
    (ignored blocks and blocks without text skipped), joined by blank lines. Images resolve against image_root
    (default: images/ beside the JSON)."""
    pages = read_json(path, "OmniDocBench annotation file")
    if not isinstance(pages, list):
        raise InputError(f"{path}: expected a JSON list of OmniDocBench pages, got {type(pages).__name__}")
    root, items = image_root or os.path.join(os.path.dirname(os.path.abspath(path)), "images"), []
    for n, page in enumerate(pages):
        info = page.get("page_info") if isinstance(page, dict) else None
        dets = page.get("layout_dets", []) if isinstance(page, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("image_path"), str) or not isinstance(dets, list) \
                or not all(isinstance(d, dict) for d in dets):
            raise InputError(f"{path}: page {n} needs page_info.image_path (a string) and a list of layout_dets")
        dets = [d for d in dets if d.get("category_type") in categories and not d.get("ignore") and d.get("text")]
        if any(not isinstance(d["text"], str) for d in dets):
            raise InputError(f"{path}: page {n} has a layout_dets text that is not a string")
        dets.sort(key=lambda d: d.get("order") if isinstance(d.get("order"), (int, float)) else 1e9)
        image = info["image_path"]
        items.append(dict(image=os.path.join(root, image), text="\n\n".join(d["text"] for d in dets), id=image))
    return ocr_check_images(items, path)

# -----------------------------------------------------------------------------
# metrics


def ocr_edit_distance(a, b):
    """Levenshtein distance (insert/delete/substitute cost 1). Bit-parallel (Myers 1999, Hyyro's global form):
    a whole DP column of the shorter string is one Python int, bit i the vertical delta D[i+1][j] - D[i][j]
    (pv: +1, mv: -1), so a full page costs len(longer) big-int steps instead of len(a) * len(b) Python ops
    (a 1,500-char pair: ms, not ~1 s). Exactly the textbook DP (tests/test_ocr.py checks it on random strings)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq = {}  # per character of b: the bit mask of the rows it occupies
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, dist = mask, 0, m  # column 0: D[i][0] = i, all deltas +1; dist tracks D[m][j]
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)  # horizontal deltas D[i][j] - D[i][j-1]: +1 ...
        mh = pv & xh          # ... and -1
        dist += bool(ph & top) - bool(mh & top)
        ph = (ph << 1) | 1    # row 0 is D[0][j] = j: its horizontal delta is always +1 (global, not substring, match)
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return dist


# OmniDocBench's clean_string deletes these (backslash-t, backslash-n, tab, newline, "/t", "/n") one after the
# other in this order, before its character filter: a later deletion can join a pair an earlier one had passed
OMNIDOC_DROPPED = ("\\t", "\\n", "\t", "\n", "/t", "/n")


def ocr_omnidoc_normalize(s):
    """OmniDocBench's text normalisation (opendatalab/OmniDocBench, utils/data_preprocess.py, clean_string): the
    OMNIDOC_DROPPED sequences deleted in order, then only [\\w\\u4e00-\\u9fff] kept ("and/not" -> "andot").
    Deliberate difference: its textblock2unicode step before it (inline LaTeX to unicode) is not applied."""
    for seq in OMNIDOC_DROPPED:
        s = s.replace(seq, "")
    return re.sub(r"[^\w\u4e00-\u9fff]", "", s)


def ocr_ned(pred, gt, normalize="none"):
    """Character NED = edit_distance / max(len(pred), len(gt)) (as DeepSeek-OCR reports OmniDocBench; Fox's
    edit_dist, ucaslcl/Fox eval_tools/eval_ocr_test.py); 0 for two empty strings.
    normalize='omnidocbench': OmniDocBench's per-sample Edit_dist (metrics/cal_metric.py, call_Edit_dist): each
    side cleaned by ocr_omnidoc_normalize, a side that cleans to empty scored raw, NaN (left out of the mean
    there) when both raw sides are empty. Deliberate difference: a page is one sample (no block matching)."""
    if normalize == "omnidocbench":
        pred, gt = ocr_omnidoc_normalize(pred) or pred, ocr_omnidoc_normalize(gt) or gt
        if not pred and not gt:
            return float("nan")
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'omnidocbench', got {normalize!r}")
    n = max(len(pred), len(gt))
    return ocr_edit_distance(pred, gt) / n if n else 0.0


def fox_has_cjk(text):
    """The official Fox scorer's test for Chinese text (contain_chinese_string): a character in [\\u4e00-\\u9fa5]."""
    return re.search(r"[\u4e00-\u9fa5]", text) is not None


def fox_words(text, cjk):
    """Fox's word split: jieba.lcut when either side holds CJK (its space and punctuation tokens count as words,
    as there), else str.split(). jieba is imported only for CJK pages."""
    if not cjk:
        return text.split()
    import importlib.util
    if importlib.util.find_spec("jieba") is None:
        raise InputError("Fox scoring of CJK text needs the jieba package (pip install jieba)")
    import jieba
    return jieba.lcut(text)


def fox_word_metrics(pred, gt):
    """Fox word-level set metrics (ucaslcl/Fox, eval_tools/eval_ocr_test.py, cal_per_metrics: nltk's precision,
    recall and f_measure on the word sets; words by fox_words).
    fox_precision: what the official Fox scorer publishes as "precision". It calls its precision function
    with (ground truth, prediction) swapped, so the number is |set(gt) & set(pred)| / |set(gt)|, the share
    of unique ground-truth words found in the output (textbook recall). Reported under that meaning so
    it is comparable with published Fox numbers; textbook precision/recall/F1 are reported beside it.
    Deliberate difference: an empty word set (nltk's None, on which the official mean fails) scores 1 when the
    other side is empty too, else 0."""
    cjk = fox_has_cjk(gt) or fox_has_cjk(pred)
    g, p = set(fox_words(gt, cjk)), set(fox_words(pred, cjk))
    hit = len(g & p)
    precision = hit / len(p) if p else float(not g)
    recall = hit / len(g) if g else float(not p)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(fox_precision=recall, word_precision=precision, word_recall=recall, word_f1=f1)


def ocr_metrics(preds, gts):
    """Per-page metrics averaged over pages (OmniDocBench averages per page too). ned_omnidoc leaves out the pages
    empty on both sides, as OmniDocBench does (NaN if every page is)."""
    if len(preds) != len(gts) or not gts:
        raise ValueError(f"ocr_metrics needs equal, non-empty lists (got {len(preds)} preds, {len(gts)} gts)")
    rows = []
    for p, g in zip(preds, gts):
        row = dict(ned=ocr_ned(p, g), ned_omnidoc=ocr_ned(p, g, "omnidocbench"), exact_match=float(p == g))
        row.update(fox_word_metrics(p, g))
        rows.append(row)
    scored = lambda k: [r[k] for r in rows if not np.isnan(r[k])]
    return {k: float(np.mean(scored(k))) if scored(k) else float("nan") for k in rows[0]}

# -----------------------------------------------------------------------------
# drawing


def ocr_draw_predictions(path, images, preds, gts, scale=2, cols=4):
    """A PNG at path (returned) of tiles: the image (upscaled) above the prediction (green = exact, red = not) and
    the truth."""
    from PIL import Image, ImageDraw
    tiles = []
    font = ocr_font(10)
    for x, p, g in zip(images, preds, gts):
        im = to_pil(x)
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        n_lines = max(p.count("\n"), g.count("\n")) + 1
        tile = Image.new("RGB", (max(im.width, 160), im.height + 26 * n_lines + 8), "white")
        tile.paste(im, (0, 0))
        d = ImageDraw.Draw(tile)
        d.multiline_text((2, im.height + 2), p, font=font, fill=(0, 140, 0) if p == g else (200, 0, 0))
        d.multiline_text((2, im.height + 4 + 13 * n_lines), g, font=font, fill=(90, 90, 90))
        tiles.append(tile)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * h))
    return save_png(grid, path)

# -----------------------------------------------------------------------------
# collapse monitor: a collapsed encoder gives every page the same features (and the GPT one stock answer)


def ocr_pairwise_cosine(x):
    """x (N, C) -> mean cosine similarity over the N*(N-1)/2 distinct pairs."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def ocr_shared_spread(x):
    """x (N images, tokens, C) -> (RMS of the image-independent part, the mean over the images; RMS of the
    rest, what differs between images). In a collapse the first grows while the second shrinks."""
    x = x.float()
    mean = x.mean(0)
    return float(mean.pow(2).mean().sqrt()), float((x - mean).pow(2).mean().sqrt())

# -----------------------------------------------------------------------------
# the model: DeepEncoder (SAM-like windowed ViT -> neck -> two stride-2 convs -> CLIP-like ViT fed those features
# -> concat -> projector) + the shared GPT


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
    # what pretrained weights need (pretrained_vision.py); the defaults are this repo's own encoder
    sam_eps: float = 1e-5    # LayerNorm epsilon of SAM's blocks and neck (SAM's own: 1e-6)
    sam_rel_pos: bool = False  # SAM's decomposed relative-position bias in every block
    clip_vit: dict = None    # ViTConfig fields of a pretrained CLIP tower (class token, pre-norm, quick_gelu, ...)
    projector: str = "mlp"   # mlp: Linear, GELU, Linear | linear: DeepSeek-OCR's one Linear
    image_mean: tuple = (0.5, 0.5, 0.5)  # the input normalisation the weights expect
    image_std: tuple = (0.5, 0.5, 0.5)

    @property
    def q(self):
        """Vision tokens per side: image / patch / 4 (the two stride-2 convs)."""
        return self.image_size // self.sam_patch // 4


def vision_token_count(image_size, patch_size, downsample=4, crop_size=0, grid=(1, 1)):
    """(q+1)*q+1: q rows of q tokens, a newline token after each row, one view separator at the end.
    273 for DeepSeek-OCR's base mode (1024 px, patch 16, downsample 4). With crops (grid (n_w, n_h) of crop_size
    tiles, not (1, 1)) also their tokens as one grid, n_h*qc rows of n_w*qc tokens, a newline after each row:
    + (n_w*qc + 1) * n_h*qc (Gundam, 640 px crops: 2 x 2 -> 273 + 420)."""
    q = image_size // patch_size // downsample
    n_w, n_h = grid
    qc = crop_size // patch_size // downsample if n_w * n_h > 1 else 0
    return (q + 1) * q + 1 + (n_w * qc + 1) * n_h * qc


class TiledPages(NamedTuple):
    """A batch of pages in crop mode: views (B, 3, S, S) their global views, crops (N, 3, C, C) every page's crops
    in page order, grids [(n_w, n_h)] one per page ((1, 1): no crops)."""
    views: torch.Tensor
    crops: torch.Tensor
    grids: list


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
    """window_partition's inverse, the padding cut off."""
    (Hp, Wp), (H, W) = padded, hw
    B = x.shape[0] // (Hp // w * Wp // w)
    x = x.view(B, Hp // w, Wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W].contiguous()


def resize_positions(pos, hw):
    """SAM's absolute positions (1, g, g, C) -> (1, h, w, C) for views of another size (bicubic, antialiased, as
    DeepSeek-OCR resizes them for its 640 px crops)."""
    grid = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=hw, mode="bicubic", antialias=True, align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1)


def rel_pos_rows(table, size):
    """SAM's relative-position table (L, d) -> (size, size, d), row (i, j) for offset i - j; a table trained for
    another size is linearly resized to 2 * size - 1 first, as SAM does."""
    n = 2 * size - 1
    if table.shape[0] != n:
        table = F.interpolate(table.float().T[None], size=n, mode="linear")[0].T.to(table.dtype)
    i = torch.arange(size, device=table.device)
    return table[i[:, None] - i[None, :] + size - 1]


def rel_pos_bias(q, table_h, table_w, h, w):
    """SAM's decomposed relative-position bias (B, heads, h*w, h*w): the unscaled queries (B, heads, h*w, d)
    dotted with the row-offset and column-offset embeddings, summed."""
    r = q.unflatten(2, (h, w))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r, rel_pos_rows(table_h, h).to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r, rel_pos_rows(table_w, w).to(q.dtype))
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], q.shape[1], h * w, h * w)


class SAMBlock(nn.Module):
    """Pre-norm ViT block on a (B, H, W, C) grid; attention inside w x w windows, or global (w = 0).
    rel_pos > 0: SAM's relative-position tables for a rel_pos x rel_pos grid (the window, or the whole grid)."""

    def __init__(self, dim, n_head, window, eps=1e-5, rel_pos=0):
        super().__init__()
        self.n_head, self.window = n_head, window
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos - 1, dim // n_head)) if rel_pos else None
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos - 1, dim // n_head)) if rel_pos else None

    def forward(self, x):
        B, H, W, C = x.shape
        h = self.ln_1(x)
        if self.window:
            h, padded = window_partition(h, self.window)
        b, hh, ww, _ = h.shape
        q, k, v = self.qkv(h).view(b, hh * ww, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        bias = None if self.rel_pos_h is None else rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hh, ww)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = self.proj(y.transpose(1, 2).reshape(b, hh, ww, C))
        if self.window:
            y = window_unpartition(y, self.window, padded, (H, W))
        x = x + y
        return x + self.mlp(self.ln_2(x))


class SAMEncoder(nn.Module):
    """Patch embed -> windowed/global blocks -> neck (1x1, 3x3 convs + LayerNorm2d) -> net_2, net_3
    (3x3 stride-2 convs): 16x fewer tokens, 4x the neck width. DeepSeek-OCR counts net_2/net_3 as SAM."""
    checkpointing = False  # model.set_checkpointing()

    def __init__(self, c):
        super().__init__()
        self.config = c
        g = c.image_size // c.sam_patch
        self.patch = nn.Conv2d(3, c.sam_dim, c.sam_patch, stride=c.sam_patch)
        self.pos = nn.Parameter(torch.zeros(1, g, g, c.sam_dim))
        windows = [0 if i in c.sam_global else c.sam_window for i in range(c.sam_layers)]
        self.blocks = nn.ModuleList([SAMBlock(c.sam_dim, c.sam_heads, w, c.sam_eps, (w or g) if c.sam_rel_pos else 0)
                                     for w in windows])
        n = c.neck_dim
        self.neck = nn.Sequential(nn.Conv2d(c.sam_dim, n, 1, bias=False), LayerNorm2d(n, eps=c.sam_eps),
                                  nn.Conv2d(n, n, 3, padding=1, bias=False), LayerNorm2d(n, eps=c.sam_eps))
        self.net_2 = nn.Conv2d(n, 2 * n, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(2 * n, 4 * n, 3, stride=2, padding=1, bias=False)
        # training aid, not part of DeepSeek-OCR: "which character is under this patch?" read off SAM's last
        # block. Inside SAM, so stage 2 freezes it with the rest.
        self.glyph = nn.Linear(c.sam_dim, c.glyph_classes) if c.glyph_classes else None

    def trunk(self, images):
        """images (B, 3, S, S) -> the last block's (B, g, g, sam_dim) grid (positions resized for another S)."""
        x = embed_patches(images, self.patch)
        x = x + (self.pos if x.shape[1:3] == self.pos.shape[1:3] else resize_positions(self.pos, x.shape[1:3]))
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x)
        return x

    def hidden_states(self, images):
        """SAM's image embedding, the neck's output, as (B, g*g, neck_dim) tokens (transformers' SAM
        last_hidden_state, flattened)."""
        return self.neck(self.trunk(images).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)

    def forward(self, images, glyphs=False):
        """-> (B, q*q, 4*neck) tokens, and with glyphs=True also (B, g, g, glyph_classes) glyph logits."""
        x = self.trunk(images)
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
    """Subtracts the image-independent part of every vision token: the mean over the batch per position and
    channel (a running mean at eval), so the GPT only sees what differs between images. Without it the small
    models here collapsed: a large component shared by all images, used as constant tokens, one answer for every
    page (notes/ocr.md). Needs a global batch of >= 2 images (one image minus its own mean is zero): under DDP one
    image per rank is enough; the script refuses a 1-image run."""

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
        # CLIP-like ViT fed the SAM features: patch_embed=False, so no patch embedding that would never receive a
        # gradient (DDP refuses parameters without one)
        self.clip = ViT(ViTConfig(**{**dict(patch_embed=False, num_tokens=c.q * c.q, n_embd=4 * c.neck_dim,
                                            n_layer=c.clip_layers, n_head=c.clip_heads), **(c.clip_vit or {})}))
        if c.projector not in ("mlp", "linear"):
            raise InputError(f"projector must be 'mlp' or 'linear', got {c.projector!r}")
        self.projector = Projector(8 * c.neck_dim, c.out_dim) if c.projector == "mlp" else nn.Linear(8 * c.neck_dim, c.out_dim)
        self.center = BatchCenter(c.q * c.q, c.out_dim) if c.center else nn.Identity()
        self.image_newline = nn.Parameter(torch.randn(c.out_dim) * c.out_dim ** -0.5)
        self.view_separator = nn.Parameter(torch.randn(c.out_dim) * c.out_dim ** -0.5)
        # training aid like SAM's glyph head: the characters of each token's area, slot by slot, read linearly
        # off what the GPT will see (so the compressor must keep them apart)
        self.slot_head = nn.Linear(c.out_dim, c.token_slots * c.glyph_classes) if c.glyph_classes and c.token_slots else None

    def features(self, images, glyphs=False):
        """images (B, 3, S, S) normalised -> dict of (B, q*q, C) at the sam, clip and projected stages
        (+ 'glyphs', SAM's per-patch character logits, and 'slots', with glyphs=True)."""
        sam, glyph_logits = self.sam(images, glyphs=True) if glyphs else (self.sam(images), None)
        clip = self.clip(sam)
        out = dict(sam=sam, clip=clip, proj=self.center(self.projector(torch.cat([clip, sam], -1))))
        if not glyphs:
            return out
        c = self.config
        slots = None if self.slot_head is None else self.slot_head(out["proj"]).view(-1, c.q, c.q, c.token_slots, c.glyph_classes)
        return dict(out, glyphs=glyph_logits, slots=slots)

    def layout(self, proj):
        """(B, q*q, D) -> (B, (q+1)*q+1, D): a newline token after each row, one view separator."""
        B, _, D = proj.shape
        q = self.config.q
        rows = torch.cat([proj.view(B, q, q, D), self.image_newline.expand(B, q, 1, D)], 2).reshape(B, -1, D)
        return torch.cat([rows, self.view_separator.expand(B, 1, D)], 1)

    def layout_tiled(self, views, crops, grids):
        """Crop mode, DeepSeek-OCR's order: per page its crops' tokens as one grid (n_h*qc rows of n_w*qc tokens, a
        newline after each row), then its global view's rows (a newline after each), the view separator.
        views (B, q*q, D), crops (N, qc*qc, D) -> (sum of vision_token_count over the pages, D)."""
        D, q, pages, start = views.shape[-1], self.config.q, [], 0
        for page, (n_w, n_h) in zip(views, grids):
            parts = []
            if n_w * n_h > 1:
                qc = math.isqrt(crops.shape[1])
                tiles = crops[start:start + n_w * n_h].view(n_h, n_w, qc, qc, D).permute(0, 2, 1, 3, 4)
                rows = torch.cat([tiles.reshape(n_h * qc, n_w * qc, D), self.image_newline.expand(n_h * qc, 1, D)], 1)
                parts.append(rows.reshape(-1, D))
                start += n_w * n_h
            parts.append(torch.cat([page.view(q, q, D), self.image_newline.expand(q, 1, D)], 1).reshape(-1, D))
            pages.append(torch.cat(parts + [self.view_separator[None]]))
        return torch.cat(pages)

    def tiled(self, pages, glyphs=False):
        """TiledPages -> (sum of vision_token_count over the pages, D) (layout_tiled); with glyphs=True also the aux
        logits of the global views, then of the crops (crops of the global views' size only)."""
        views, crops, grids = pages
        B, same_size = len(views), crops.shape[-1] == views.shape[-1]
        if glyphs and len(crops) and not same_size:
            raise InputError(f"the glyph and slot heads need crops of the global view's size: crops are "
                             f"{crops.shape[-1]} px, global views {views.shape[-1]} px")
        if same_size:  # one pass: batch centring sees every view
            f = self.features(torch.cat([views, crops]), glyphs)
            crop_proj = f["proj"][B:]
        else:
            f = self.features(views, glyphs)
            crop_proj = self.features(crops)["proj"] if len(crops) else None
        out = self.layout_tiled(f["proj"][:B], crop_proj, grids)
        return (out, dict(glyphs=f["glyphs"], slots=f["slots"])) if glyphs else out

    def forward(self, images, glyphs=False):
        """-> (B, (q+1)*q+1, D) vision embeddings (TiledPages: tiled()), and with glyphs=True also dict(glyphs=SAM's
        per-patch logits, slots=the projected tokens' per-slot logits or None)."""
        if isinstance(images, TiledPages):
            return self.tiled(images, glyphs)
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


def encoder_config(d):
    """A checkpoint meta's encoder dict -> EncoderConfig (JSON gives sam_global back as a list)."""
    c = dataclass_from_dict(EncoderConfig, d)
    c.sam_global = tuple(c.sam_global)
    c.image_mean, c.image_std = tuple(c.image_mean), tuple(c.image_std)
    return c


def model_from_meta(meta):
    """The OCR model a checkpoint's meta describes (its glyph heads, vocab and sequence length included)."""
    return OCRModel(DeepEncoder(encoder_config(meta["encoder"])), GPT(dataclass_from_dict(GPTConfig, meta["gpt"])))


def load_encoder(src, out_dim):
    """A stage-1 encoder-only checkpoint (<out_dir>/encoder) -> DeepEncoder with its weights."""
    meta = load_meta(src)
    if meta.get("kind") != "deepencoder":
        raise InputError(f"init_encoder {src} is not an encoder-only checkpoint (meta kind {meta.get('kind')!r})")
    enc = DeepEncoder(encoder_config(meta["encoder"]))
    load_checkpoint(src, enc)
    if enc.config.out_dim != out_dim:
        raise InputError(f"encoder projects to {enc.config.out_dim} but the GPT has n_embd {out_dim}")
    return enc


def encoder_flops(enc, glyphs=False, size=0):
    """Training FLOPs per image, each module counted at the positions it runs at: SAM's patch embedding, blocks
    and neck on its g x g grid, net_2 on (g/2)^2, net_3, CLIP, the projector and the slot head on q x q. 6 per
    weight entry (conv kernels included) and position, plus attention's 12 x keys x width per position and layer
    (PaLM's accounting, as gpt_flops_per_token); a frozen module (stage 2's SAM) runs forward only: a third of
    that. Biases, norms and position embeddings are adds, not matmuls: left out. size: a view of that size (a crop)
    instead of image_size."""
    c, sam = enc.config, enc.sam
    g = (size or c.image_size) // c.sam_patch
    q = g // 4

    def cost(module, positions, keys=0, width=0):
        weights = [p for n, p in module.named_parameters()  # matmul weights (not tables added or looked up)
                   if p.dim() >= 2 and n not in ("pos", "cls", "registers") and "rel_pos" not in n]
        per = 6 if any(p.requires_grad for p in module.parameters()) else 2
        return per * positions * (sum(p.numel() for p in weights) + 2 * keys * width)

    total = cost(sam.patch, g * g) + cost(sam.neck, g * g) + cost(sam.net_2, (2 * q) ** 2) + cost(sam.net_3, q * q)
    total += sum(cost(b, g * g, (b.window or g) ** 2, c.sam_dim) for b in sam.blocks)
    total += cost(enc.clip, q * q, q * q * len(enc.clip.blocks), 4 * c.neck_dim) + cost(enc.projector, q * q)
    if glyphs:
        total += cost(sam.glyph, g * g) + (cost(enc.slot_head, q * q) if enc.slot_head is not None else 0)
    return total


def train_flops(model, images, tokens, glyphs=False, crops=0, crop_size=0):
    """One training step's FLOPs (the MFU numerator): the encoder per image (and per crop) plus the GPT per token."""
    gpt_per_token = gpt_flops_per_token(model.gpt.config, model.gpt.num_params(exclude_embedding=True))
    crop_flops = encoder_flops(model.encoder, glyphs, crop_size) * crops if crops else 0
    return encoder_flops(model.encoder, glyphs) * images + crop_flops + gpt_per_token * tokens
