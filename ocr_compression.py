"""
The optical-compression study (DeepSeek-OCR's headline curve): decoding precision against the compression ratio,
text tokens per vision token, one line per vision-token budget. As in the paper, one model per budget reads pages
of every text length: per budget one train_ocr.py run (a subprocess) on synthetic paragraph pages of all the
lengths, then per point one eval_only run of that checkpoint on pages of one length; each results.json gives the
metrics and the measured token counts. A budget is set one of two ways (`budget_knob`):

  - 'sam_patch' (the default): 64 px pages at train_ocr's typewriter font (7 px pitch, 16 px lines, the recipe's
    legible default), a vision token covering 4 * sam_patch px square: sam_patch 4 / 8 / 16 -> 16 / 4 / 1
    tokens, a deeper compressor in effect;
  - 'image_size' (the paper's way): the same pages drawn at each size, the font scaled with it (`font`), at
    `sam_patch`: q*q = (image_size / (4 * sam_patch))^2 tokens (sam_patch 4: 32 / 48 / 64 px -> 4 / 9 / 16);
  - a length LINESxCHARS is an eval page of exactly LINES lines of up to CHARS characters; training pages have
    1 to the most LINES lines. The ratio leaves out the q newlines and the separator, as the paper counts 64 / 100
    / 256 / 400; text tokens are counted by the run with its own tokenizer (bytes; the LLM's with --init_gpt).

    python ocr_compression.py                                     # 1 / 4 / 16 tokens (token area) x 4 lengths
    python ocr_compression.py --budget_knob=image_size --budgets="(32,48,64,80)"   # 4 / 9 / 16 / 25 tokens
    python ocr_compression.py --budgets=(4,) --lengths=('3x8',) --steps=300
    python ocr_compression.py --budget_knob=image_size --image_size=512 --sam_patch=16 --budgets="(512,640)" \
        --lengths="('20x60','30x70')" --extra="--init_gpt=hf:nanochat-students/base-d20 --device=cuda"

Writes <out>/compression.md (the table and where precision crosses 95% and 60%), <out>/compression.png (Fox
precision vs ratio, the paper's points beside), compression.json, and the runs: <out>/p<sam_patch> or
<out>/s<px> (training), the same + _<length> (evals). Finished runs are read back (see train_ocr below).
"""
import json
import os
import shlex
import subprocess
import sys
import time

from configurator import configure
from data_ocr import ocr_parse_layout
from model import InputError

# -----------------------------------------------------------------------------
# config
out = 'out/ocr-compression'
budget_knob = 'sam_patch'  # what a budget sets: 'sam_patch' (the area a token covers, fixed font) or 'image_size'
budgets = (16, 8, 4)       # sam_patch values: 1, 4, 16 vision tokens on 64 px pages (image sizes with 'image_size')
image_size = 64            # the page with 'sam_patch'; the page whose font (the recipe's) the others scale
sam_patch = 4              # the patch with 'image_size' (16: DeepSeek-OCR's, 512 px -> 64 tokens)
lengths = ('1x4', '1x8', '2x8', '3x8')  # LINESxCHARS per eval page (3x8: the recipe's full 64 px page)
steps = 6800               # training steps per budget (the OCR recipe's default)
seconds = 0.0              # > 0: also stop a budget's training after this many training seconds
seed = 1337
n_eval = 100
threads = 1                # torch threads per run
extra = ''                 # more train_ocr.py arguments, e.g. '--batch_size=32'
# -----------------------------------------------------------------------------

# DeepSeek-OCR on Fox's English pages (paper, Table 2): the two ends of each budget's range. The 100-token ratios
# are the 64-token ones x 64/100 (the same page buckets: 600-700 and 1,200-1,300 text tokens).
PAPER = {64: [(10.5, 96.5), (19.7, 59.1)], 100: [(6.7, 98.5), (12.6, 87.1)]}


def launch(args):
    """python train_ocr.py <args> in a fresh process, its output to the console; a failed run stops the study."""
    cmd = [sys.executable, "train_ocr.py", *args]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def train_ocr(args, run_dir, after=None):
    """One train_ocr.py run -> (its results.json, its record). A run that already finished in run_dir with the
    same arguments (and, for an eval, after the same training run `after`) is read back, not repeated: an
    interrupted grid resumes, and budgets can run in parallel processes (one --budgets each, the same --out)
    before one last call with all of them writes the table."""
    args = [*args, "--bench_tokens=0", f"--torch_threads={threads}", f"--seed={seed}", f"--out_dir={run_dir}",
            *shlex.split(extra)]
    done = os.path.join(run_dir, "grid_run.json")  # written after the run succeeded: arguments, wall time, after
    record = json.load(open(done)) if os.path.exists(done) else {}
    if record.get("args") == args and record.get("after") == after:
        print(f"read back {run_dir} (finished earlier with the same arguments)", flush=True)
    else:
        t0 = time.time()
        launch(args)
        record = dict(args=args, wall=time.time() - t0, after=after)
        with open(done, "w") as f:
            json.dump(record, f)
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f), record


def font(px):
    """The typewriter font on a px page: the recipe's on image_size (7 px pitch, 16 px lines, 10-11 px letters at
    64 px) scaled by px / image_size, so every budget's page shows the same text, smaller or larger (the paper's
    one page at each mode's resolution): pitch, line gap, font sizes (pitch and gap rounded down, so it fits)."""
    s = px / image_size
    return int(7 * s), int(16 * s), (max(4, round(10 * s)), max(4, round(11 * s)))


def text_args(px, length=None):
    """train_ocr.py's text arguments on a px page: an eval page of one length (exactly LINES lines of up to CHARS
    characters), or (None) training pages of 1 to the most LINES lines (filled on the image_size page, at most the
    longest CHARS on a scaled one)."""
    most_lines, most_chars = (max(x) for x in zip(*map(ocr_parse_layout, lengths)))
    n, m = ocr_parse_layout(length) if length else (1, 0 if budget_knob == 'sam_patch' else most_chars)
    args = [f"--min_lines={n}", f"--max_lines={n if length else most_lines}", f"--line_chars={m}"]
    if budget_knob == 'sam_patch':
        return args
    pitch, line_gap, sizes = font(px)
    return args + [f"--pitch={pitch}", f"--line_gap={line_gap}", f"--font_sizes={sizes}"]


def run_budget(budget):
    """Trains one model on pages of every length at this budget, evaluates it on each -> the budget's rows."""
    px, patch = (budget, sam_patch) if budget_knob == 'image_size' else (image_size, budget)
    longest = max(n * (m + 1) for n, m in map(ocr_parse_layout, lengths))  # bytes, newlines included
    shape = [f"--image_size={px}", f"--sam_patch={patch}", "--styles=('paragraph',)",
             f"--max_text_tokens={max(longest + 8, 48)}"]
    name = f"s{px}" if budget_knob == 'image_size' else f"p{patch}"
    train_dir = os.path.join(os.path.abspath(out), name)  # absolute: the records match from any working dir
    _, trained = train_ocr(shape + text_args(px) + [f"--max_steps={steps}", f"--max_train_seconds={seconds}",
                                                  f"--eval_interval={steps}", "--n_eval=8"], train_dir)
    rows = []
    for length in lengths:
        res, _ = train_ocr(shape + text_args(px, length) + ["--eval_only=True", f"--n_eval={n_eval}",
                                                        f"--init_from={os.path.join(train_dir, 'ckpt')}"],
                           os.path.join(os.path.abspath(out), f"{name}_{length}"), after=trained)
        m = res["metrics"]
        rows.append(dict(budget=round(m["vision_tokens_grid"]), image_size=px, token_px=4 * patch, length=length,
                         text_tokens=m["text_tokens"], ratio=m["text_tokens"] / m["vision_tokens_grid"],
                         fox_precision=m["fox_precision"], ned=m["ned"], steps=res["step"], seed=seed,
                         seconds=trained["wall"]))
    return rows


def crossing(rows, level):
    """Where precision falls below `level` as the ratio grows: interpolated between two points, or a sentence."""
    rows = sorted(rows, key=lambda r: r["ratio"])
    if rows[0]["fox_precision"] < level:
        return f"below from the first point ({rows[0]['ratio']:.2f}x)"
    for a, b in zip(rows, rows[1:]):
        if a["fox_precision"] >= level > b["fox_precision"]:
            t = (a["fox_precision"] - level) / (a["fox_precision"] - b["fox_precision"])
            return f"{a['ratio'] + t * (b['ratio'] - a['ratio']):.2f}x"
    return f"not crossed in range (up to {rows[-1]['ratio']:.2f}x)"


def write_table(rows, path):
    head = ("| vision tokens (q*q) | image px | token px | text length | text tokens (mean) | ratio | Fox precision "
            "| NED | steps | seed | training wall s (the budget's model) |\n" + "|---" * 11 + "|\n")
    body = "".join(f"| {r['budget']} | {r['image_size']} | {r['token_px']} | {r['length']} | {r['text_tokens']:.1f} "
                   f"| {r['ratio']:.2f}x | {100 * r['fox_precision']:.1f}% | {r['ned']:.3f} | {r['steps']} "
                   f"| {r['seed']} | {r['seconds']:.0f} |\n" for r in rows)
    cross = "".join(f"| {b} | {crossing(rs, 0.95)} | {crossing(rs, 0.60)} |\n" for b, rs in by_budget(rows).items())
    with open(path, "w") as f:
        f.write("Ratio = text tokens (the run's tokenizer) / q*q vision tokens (newlines and the separator not "
                "counted).\n\n" + head + body + "\n| vision tokens | precision < 95% at | precision < 60% at |\n"
                "|---|---|---|\n" + cross)


def by_budget(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r["budget"], []).append(r)
    return groups


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot(rows, path, size=(720, 480), margin=60):
    """Fox precision (%) vs ratio with Pillow: a line per budget (dots), the paper's points as rings."""
    from PIL import Image, ImageDraw
    from data_ocr import ocr_font
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ocr_font(12)
    x_max = max([r["ratio"] for r in rows] + [x for pts in PAPER.values() for x, _ in pts]) * 1.05
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(ratio, precision):
        return margin + ratio / x_max * w, margin + (1 - precision / 100) * h

    d.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for p in range(0, 101, 20):
        d.text((margin - 30, xy(0, p)[1] - 6), f"{p}%", fill="black", font=font)
    for k in range(0, int(x_max) + 1, max(1, int(x_max) // 10)):
        d.text((xy(k, 0)[0] - 6, margin + h + 6), f"{k}x", fill="black", font=font)
    d.text((margin + w // 2 - 120, size[1] - 24), "compression: text tokens / vision tokens", fill="black", font=font)
    d.text((margin, 20), "Fox precision vs compression (dots: this run, rings: DeepSeek-OCR paper)", fill="black",
           font=font)
    legend = []
    for i, (budget, rs) in enumerate(sorted(by_budget(rows).items())):
        c = COLOURS[i % len(COLOURS)]
        pts = [xy(r["ratio"], 100 * r["fox_precision"]) for r in sorted(rs, key=lambda r: r["ratio"])]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        legend.append((f"{budget} tokens (this run)", c, True))
    for j, (budget, pts) in enumerate(sorted(PAPER.items())):
        c = COLOURS[(len(legend) + j) % len(COLOURS)]
        for x, y in (xy(*p) for p in pts):
            d.ellipse([x - 6, y - 6, x + 6, y + 6], outline=c, width=2)
        legend.append((f"{budget} tokens (paper)", c, False))
    for k, (label, c, filled) in enumerate(legend):
        y = margin + h - 18 * (len(legend) - k) - 4
        box = [margin + w - 190, y, margin + w - 180, y + 10]
        d.ellipse(box, fill=c if filled else None, outline=c, width=2)
        d.text((margin + w - 174, y - 2), label, fill="black", font=font)
    img.save(path)
    return path


def main():
    if not budgets or not lengths:
        raise InputError("the grid needs at least one budget and one text length")
    if budget_knob not in ('image_size', 'sam_patch'):
        raise InputError(f"budget_knob is 'image_size' or 'sam_patch', got {budget_knob!r}")
    for b in budgets:  # every point fits before the first run starts
        px, patch = (b, sam_patch) if budget_knob == 'image_size' else (image_size, b)
        if px % (4 * patch):
            raise InputError(f"image_size {px} is not a multiple of 4 * sam_patch ({4 * patch})")
        pitch, line_gap, _ = font(px if budget_knob == 'image_size' else image_size)
        for n, m in map(ocr_parse_layout, lengths):
            if pitch < 2 or n * line_gap > px - 4 or m * pitch > px - 4:
                raise InputError(f"{n}x{m} does not fit a {px} px page at its font ({pitch} px pitch, {line_gap} px "
                                 f"lines)")
    os.makedirs(out, exist_ok=True)
    rows = [row for s in budgets for row in run_budget(s)]
    write_table(rows, os.path.join(out, "compression.md"))
    plot(rows, os.path.join(out, "compression.png"))
    with open(os.path.join(out, "compression.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(open(os.path.join(out, "compression.md")).read())


if __name__ == "__main__":
    config = configure(globals())
    main()
