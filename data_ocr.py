"""
OCR data (train_ocr.py's; shared helpers live in data.py): synthetic documents rendered with Pillow's bundled
font, readers for JSONL / Fox / OmniDocBench annotations, the OCR metrics and a drawing helper.

Held-out text is never seen in training: every whitespace-separated word (letters, numbers, prices)
belongs to exactly one split by a hash of its characters (`ocr_word_split`), so a val image can only be
read by reading its characters, not by recalling a memorised word.
"""
import json
import os
import re
import zlib

import numpy as np
import torch

from data import pil_to_tensor, read_json, sample_rng, to_pil
from model import InputError

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


def ocr_layout_text(rng, split, style, font, width, max_lines, pitch=0):
    """Lines of text (each fits in `width` pixels) for one document style."""
    def fits(s):
        return ocr_line_width(font, s, pitch) <= width

    lines = []
    n_lines = int(rng.integers(1, max_lines + 1))
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


def ocr_render(lines, image_size, font_size, x0, y0, line_gap, ink, paper, right_align_last_word=False, pitch=0):
    """Lines -> grayscale-on-RGB PIL image. pitch > 0: typewriter layout, one character per `pitch` px cell."""
    from PIL import Image, ImageDraw
    img = Image.new("L", (image_size, image_size), int(paper))
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
                x = max(x, image_size - 2 - font.getlength(word))
            draw.text((x, y), word, font=font, fill=int(ink))
            x += font.getlength(word) + ocr_word_gap(font)
    return img.convert("RGB")


OCR_GLYPH_CLASSES = 95  # 0 = background (and space), 1..94 = printable ASCII '!'..'~'
OCR_TOKEN_SLOTS = 3     # characters a vision token is asked to carry (16 px tokens, 7 px pitch: 2-3 per token)


def ocr_glyph_labels(lines, image_size, patch, x0, y0, line_gap, font_size, pitch):
    """Which character each patch of a typewriter page shows: (G, G) int64, G = image_size // patch, raster
    order like the SAM tokens. A patch whose centre lies in character j's cell of line i (x in
    [x0 + j*pitch, x0 + (j+1)*pitch), y in [y0 + i*line_gap, y0 + i*line_gap + font_size + 2)) gets
    ord(ch) - 32; background and spaces 0; characters outside printable ASCII -1 (ignored)."""
    g = image_size // patch
    out = np.zeros((g, g), dtype=np.int64)
    centres = (np.arange(g) + 0.5) * patch
    for i, line in enumerate(lines):
        top = y0 + i * line_gap
        rows = (centres >= top) & (centres < top + font_size + 2)
        for j, ch in enumerate(line):
            cols = (centres >= x0 + j * pitch) & (centres < x0 + (j + 1) * pitch)
            code = ord(ch) - 32
            out[np.ix_(rows, cols)] = code if 0 <= code < OCR_GLYPH_CLASSES else -1
    return out


def ocr_slot_labels(lines, image_size, token_px, slots, x0, y0, line_gap, font_size, pitch):
    """Which characters each vision token must carry, left to right: (q, q, slots) int64, q = image_size //
    token_px. Line i belongs to the token row holding its vertical centre; character j, centred at x, to
    token column x // token_px and slot floor(slots * (x % token_px) / token_px). Empty slots and spaces 0,
    characters outside printable ASCII (or two in one slot: pitch < token_px / slots) -1 (ignored)."""
    q = image_size // token_px
    out = np.zeros((q, q, slots), dtype=np.int64)
    for i, line in enumerate(lines):
        r = int((y0 + i * line_gap + (font_size + 2) / 2) // token_px)
        for j, ch in enumerate(line):
            x = x0 + (j + 0.5) * pitch
            c, k = int(x // token_px), int(slots * (x % token_px) / token_px)
            if not (0 <= r < q and 0 <= c < q):
                continue
            code = ord(ch) - 32
            taken = out[r, c, k] != 0
            out[r, c, k] = code if 0 <= code < OCR_GLYPH_CLASSES and not taken else -1
    return out


def ocr_synthetic_sample(seed, split, index, image_size=64, font_sizes=(10, 11, 12), max_lines=3,
                         noise=0.04, styles=OCR_STYLES, paper=(200, 255), ink=(0, 90), pitch=0, line_gap=0,
                         glyph_patch=0):
    """One synthetic document: a pure function of (seed, split, index). pitch > 0: typewriter layout
    (fixed-pitch cells); line_gap > 0: lines on a fixed grid (y jitter of 2 px) instead of anywhere.
    glyph_patch > 0 (needs pitch): also 'glyphs', the character under every patch (ocr_glyph_labels), and
    'slots', the characters each vision token covers (ocr_slot_labels, tokens of 4 * glyph_patch px, 3 slots).
    -> dict(image float (3, S, S) in [0, 1], text 'line\\nline', style, id[, glyphs])."""
    rng = sample_rng(seed, split, index)
    style = styles[int(rng.integers(len(styles)))]
    font_size = int(rng.choice(font_sizes))
    font = ocr_font(font_size)
    grid = line_gap > 0
    line_gap = line_gap or font_size + 2 + int(rng.integers(0, 3))
    fit_lines = max(1, min(max_lines, (image_size - 4) // line_gap))
    x0 = int(rng.integers(1, 4 if pitch else 6))
    lines = ocr_layout_text(rng, split, style, font, image_size - x0 - 1, fit_lines, pitch)
    y_room = image_size - 2 - line_gap * len(lines)
    y0 = int(rng.integers(0, 3)) if grid else int(rng.integers(-1, max(0, y_room) + 1))
    paper_level, ink_level = rng.uniform(*paper), rng.uniform(*ink)
    img = ocr_render(lines, image_size, font_size, x0, y0, line_gap, ink_level, paper_level, style == "receipt", pitch)
    x = pil_to_tensor(img)
    if noise > 0:  # sensor noise, its strength drawn per image
        x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, noise), x.shape[1:]).astype(np.float32))
        x = x.clamp(0, 1)
    out = dict(image=x, text="\n".join(lines), style=style, id=f"{split}_{index}")
    if glyph_patch and pitch:
        out["glyphs"] = ocr_glyph_labels(lines, image_size, glyph_patch, x0, y0, line_gap, font_size, pitch)
        out["slots"] = ocr_slot_labels(lines, image_size, 4 * glyph_patch, OCR_TOKEN_SLOTS, x0, y0, line_gap, font_size, pitch)
    return out


def ocr_probe_images(image_size=64, seed=0):
    """The fixed collapse-monitor probe set: noise, white, black, a text page. -> (names, (4, 3, S, S))."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(3, image_size, image_size, generator=g)
    white, black = torch.ones(3, image_size, image_size), torch.zeros(3, image_size, image_size)
    text = ocr_synthetic_sample(seed, "probe", 0, image_size, noise=0.0)["image"]
    return ["noise", "white", "black", "text"], torch.stack([noise, white, black, text])

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


def ocr_omnidoc_normalize(s):
    """OmniDocBench's text normalisation before NED: whitespace and every non-word character removed
    (only \\w characters kept: letters, digits, underscore, CJK)."""
    return re.sub(r"[^\w]", "", s)


def ocr_ned(pred, gt, normalize="none"):
    """Character NED = edit_distance / max(len(pred), len(gt)) (as DeepSeek-OCR reports OmniDocBench);
    0 for two empty strings. normalize='omnidocbench' applies OmniDocBench's normalisation first."""
    if normalize == "omnidocbench":
        pred, gt = ocr_omnidoc_normalize(pred), ocr_omnidoc_normalize(gt)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'omnidocbench', got {normalize!r}")
    n = max(len(pred), len(gt))
    return ocr_edit_distance(pred, gt) / n if n else 0.0


def fox_word_metrics(pred, gt):
    """Fox word-level set metrics (words = str.split()).
    fox_precision: what the official Fox scorer publishes as "precision". It calls its precision function
    with (ground truth, prediction) swapped, so the number is |set(gt) & set(pred)| / |set(gt)|, the share
    of unique ground-truth words found in the output (textbook recall). Reported under that meaning so
    it is comparable with published Fox numbers; textbook precision/recall/F1 are reported beside it."""
    g, p = set(gt.split()), set(pred.split())
    hit = len(g & p)
    precision = hit / len(p) if p else float(not g)
    recall = hit / len(g) if g else float(not p)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(fox_precision=recall, word_precision=precision, word_recall=recall, word_f1=f1)


def ocr_metrics(preds, gts):
    """Per-page metrics averaged over pages (OmniDocBench averages per page too)."""
    if len(preds) != len(gts) or not gts:
        raise ValueError(f"ocr_metrics needs equal, non-empty lists (got {len(preds)} preds, {len(gts)} gts)")
    rows = []
    for p, g in zip(preds, gts):
        row = dict(ned=ocr_ned(p, g), ned_omnidoc=ocr_ned(p, g, "omnidocbench"), exact_match=float(p == g))
        row.update(fox_word_metrics(p, g))
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

# -----------------------------------------------------------------------------
# drawing


def ocr_draw_predictions(images, preds, gts, scale=2, cols=4):
    """Each tile: the image (upscaled) above the prediction (green = exact, red = not) and the truth."""
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
    return grid

# -----------------------------------------------------------------------------
# collapse monitor (the journal's features of every page became one)


def ocr_pairwise_cosine(x):
    """x (N, C) -> mean cosine similarity over the N*(N-1)/2 distinct pairs."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def ocr_shared_spread(x):
    """x (N images, tokens, C) -> (RMS of the image-independent part, the mean over the images; RMS of the
    rest, what differs between images). The journal's collapse: the first grows while the second shrinks."""
    x = x.float()
    mean = x.mean(0)
    return float(mean.pow(2).mean().sqrt()), float((x - mean).pow(2).mean().sqrt())
