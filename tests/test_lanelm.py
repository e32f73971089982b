"""LaneLM: tokenizer round trips on real lane shapes and its id layout, the row grid, the official TuSimple
metric on hand-computed cases, the TuSimple reader on files written here, the synthetic scenes, and short
end-to-end runs of train_lanelm.py (loss falls, results.json + PNG + checkpoint, exact resume, eval_only,
a TuSimple-form dataset, one-line errors for bad input)."""
import json
import math
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from data import sample_rng
import numpy as np

import checkpoint
import model
from data_lanelm import (TUSIMPLE_H_SAMPLES, LaneTokenizer, lane_draw, lane_from_grid, lane_row_grid, lane_seg_target,
                         lane_slots, lane_sort, lane_synthetic_sample, lane_to_grid,
                         tusimple_angle, tusimple_bench, tusimple_line_accuracy, tusimple_metrics,
                         tusimple_read_labels, tusimple_sample)
from inprocess import run_script  # noqa: E402
from test_lane_metrics import write_culane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HS = TUSIMPLE_H_SAMPLES  # 160..710 step 10, 56 rows


def real_lanes(n_images=12):
    """Lane shapes from the synthetic generator at TuSimple's own 56 rows (curves, side exits)."""
    lanes = []
    for i in range(n_images):
        s = lane_synthetic_sample(sample_rng(0, "val", i), 80, 48, HS)
        lanes += lane_sort(s["lanes"])
    return lanes


def max_err(xs, ref):
    assert [x < 0 for x in xs] == [r < 0 for r in ref], "decoded rows differ from the lane's rows"
    return max(abs(a - b) for a, b in zip(xs, ref) if b >= 0)

# -----------------------------------------------------------------------------
# tokenizer


def test_id_layout_default():
    tok = LaneTokenizer()
    assert (tok.nbins, tok.max_dx) == (200, 32)
    ranges = dict(abs=range(0, 200), dx=range(tok.dx0, tok.row0), row=range(tok.row0, tok.gap),
                  bos=range(tok.bos0, tok.image))
    assert len(ranges["dx"]) == 65 and len(ranges["row"]) == 56 and len(ranges["bos"]) == 4
    singles = [tok.gap, tok.reanchor, tok.eos, tok.image, tok.pad]
    ids = [i for r in ranges.values() for i in r] + singles
    assert sorted(ids) == list(range(tok.vocab_size)) and tok.vocab_size == 330  # disjoint, no holes
    assert [tok.bos(k) for k in range(4)] == list(range(tok.bos0, tok.bos0 + 4))  # one BOS per lane id
    with pytest.raises(ValueError):
        tok.bos(4)
    for mode in ("absolute", "relative"):
        t = LaneTokenizer(mode)
        assert t.row0 == 200 and t.vocab_size == 330 - 65  # no DX range: codes are ABS or shared


@pytest.mark.parametrize("bottom_up", [True, False])
@pytest.mark.parametrize("mode", ["relative_disjoint", "absolute", "relative"])
def test_round_trip_real_lanes_within_half_a_bin(mode, bottom_up):
    tok = LaneTokenizer(mode, bottom_up=bottom_up)
    lanes = real_lanes()
    assert len(lanes) >= 30
    for k, lane in enumerate(lanes):
        ids = tok.encode(lane, k % 4)
        assert ids[0] == tok.bos(k % 4) and ids[-1] == tok.eos
        xs, ok = tok.decode(ids, len(HS))
        assert ok
        assert max_err(xs, lane) <= tok.bin_w / 2 + 1e-9  # 3.2 px at 1280 / 200


def test_straight_lane_is_not_clamped_to_the_image_edge():
    """Relative codes must never be clamped to the last ABS bin (a straight lane would become
    [50, 199, 199, ...] and decode to the image edge)."""
    tok = LaneTokenizer()
    lane = [-2.0] * 10 + [50 * tok.bin_w + 1.0] * 40 + [-2.0] * 6
    ids = tok.encode(lane, 0)
    assert ids[:4] == [tok.bos(0), tok.row0 + 49, 50, tok.dx0 + 32]  # bottom-up: row 49, ABS 50, then dx = 0
    assert ids[3:-1] == [tok.dx0 + 32] * 39 and tok.nbins - 1 not in ids
    xs, ok = tok.decode(ids, 56)
    assert ok and max(x for x in xs if x >= 0) < 330


@pytest.mark.parametrize("mode", ["relative_disjoint", "relative"])
def test_large_jump_reanchors_instead_of_clamping(mode):
    tok = LaneTokenizer(mode)
    lane = [100.0, 110.0, 700.0, 705.0, -2.0, -2.0]  # a 600 px (94 bin) jump > max_abs_dx
    ids = tok.encode(lane, 1)
    if mode == "relative_disjoint":
        assert [t for t in ids if t < tok.nbins] == [tok.x_bin(705.0), tok.x_bin(110.0)]  # ABS re-anchors
    else:
        assert tok.reanchor in ids
    xs, ok = tok.decode(ids, 6)
    assert ok and max_err(xs, lane) <= tok.bin_w / 2


def test_gap_inside_lane_and_empty_lane():
    tok = LaneTokenizer()
    lane = [-2, 300.0, 305.0, -2, -2, 330.0, 334.0, -2]
    ids = tok.encode(lane, 2)
    assert ids.count(tok.gap) == 2
    xs, ok = tok.decode(ids, 8)
    assert ok and max_err(xs, lane) <= tok.bin_w / 2
    assert tok.encode([-2.0] * 8, 3) == [tok.bos(3), tok.eos]
    assert tok.decode([tok.bos(3), tok.eos], 8) == ([-2.0] * 8, True)


def test_invalid_sequences_are_flagged_not_raised():
    tok = LaneTokenizer()
    d = lambda ids: tok.decode(ids, 5)  # noqa: E731
    assert d([tok.dx0 + 32, tok.eos])[1] is False                      # no ROW first
    assert d([tok.row0, tok.dx0 + 33, tok.eos])[1] is False            # DX with nothing before it
    assert d([tok.row0, 10, tok.dx0 + 32])[1] is False                 # no EOS
    assert d([tok.row0, 10, tok.row0 + 1, tok.eos])[1] is False        # ROW mid-lane
    assert d([tok.row0, 1, tok.dx0, tok.eos])[1] is False              # steps off the image (bin -31)
    xs, ok = d([tok.row0 + 1, 10, 11, 12, tok.eos])                    # bottom-up: runs past row 0
    assert not ok and xs[1] == tok.bin_x(10) and xs[0] == tok.bin_x(11)
    assert d([])[1] is False

@pytest.mark.parametrize("mode", ["relative_disjoint", "absolute", "relative"])
def test_key_tokens_are_marked_by_position(mode):
    """Key tokens (loss weight key_token_weight) = start row, absolutely anchored points, EOS, in every mode.
    relative_disjoint: exactly its ABS, ROW and EOS ids (the id-range rule the default run was trained with);
    the other modes mark the same lane positions, though their ids cannot tell (every point is ABS-range)."""
    ref, tok = LaneTokenizer(), LaneTokenizer(mode)
    lanes = real_lanes(4) + [[100.0, 110.0, 700.0, 705.0, -2.0, 300.0, 302.0] + [-2.0] * 49]  # a jump, a gap
    n_more = 0
    for k, lane in enumerate(lanes):
        ids, key = tok.encode(lane, k % 4, with_key=True)
        assert ids == tok.encode(lane, k % 4) and len(key) == len(ids)
        ref_ids, ref_key = ref.encode(lane, k % 4, with_key=True)
        by_range = [t < ref.nbins or ref.row0 <= t < ref.gap or t == ref.eos for t in ref_ids]
        assert ref_key == by_range
        strip = [kk for t, kk in zip(ids, key) if t != tok.reanchor]  # REANCHOR: an extra, unweighted token
        assert strip == ref_key
        n_more += sum(t < tok.nbins for t in ids) - sum(t < tok.nbins for t, kk in zip(ids, key) if kk)
    assert n_more > 0 if mode != "relative_disjoint" else n_more == 0  # the old id rule over-weighted these


def test_row_tokens_mean_one_y_in_every_image():
    """TuSimple's 0313 clips label rows 240..710, the others 160..710: the same lane must give the same
    tokens (ROW = an index into the global grid, not into each image's h_samples), and decode back at each
    image's own rows."""
    rows = lane_row_grid(10)
    assert rows == HS and lane_row_grid(20)[:3] == [160, 180, 200]
    hs_a, hs_b = list(range(240, 720, 10)), list(range(160, 720, 10))
    x_of = lambda y: 900.0 - 0.8 * (y - 300) if y >= 300 else -2.0  # noqa: E731 -- a lane from y=300 down
    lane_a, lane_b = [x_of(y) for y in hs_a], [x_of(y) for y in hs_b]
    tok = LaneTokenizer()
    ids_a, ids_b = tok.encode(lane_to_grid(lane_a, hs_a, rows), 0), tok.encode(lane_to_grid(lane_b, hs_b, rows), 0)
    assert ids_a == ids_b and ids_a[1] == tok.row0 + rows.index(710)
    assert tok.encode(lane_a, 0) != tok.encode(lane_b, 0)  # indexing each image's own rows: one token, two ys
    for lane, hs in ((lane_a, hs_a), (lane_b, hs_b)):
        xs, ok = tok.decode(ids_a, len(rows))
        back = lane_from_grid(xs, hs, rows)
        assert ok and len(back) == len(hs) and max_err(back, lane) <= tok.bin_w / 2


def test_lane_slots_are_ego_relative():
    lane = lambda x_bottom: [-2.0, x_bottom + 50, x_bottom]  # noqa: E731
    slots, dropped = lane_slots([lane(800), lane(100), lane(1200), lane(500)], 4)
    assert [s[-1] for s in slots] == [100, 500, 800, 1200] and dropped == 0
    slots, dropped = lane_slots([lane(500), lane(800), lane(1200)], 4)
    assert slots[0] is None and [s[-1] for s in slots[1:]] == [500, 800, 1200]
    slots, dropped = lane_slots([lane(50), lane(300), lane(500), lane(800), [-2.0] * 3], 4)
    assert [s[-1] for s in slots[:2]] == [300, 500] and slots[3] is None and dropped == 1
    sides = [[-2.0, 30.0, -2.0], [-2.0, 1270.0, -2.0]]  # exits the image side: the side decides
    assert lane_slots(sides, 4)[0][1] == sides[0] and lane_slots(sides, 4)[0][2] == sides[1]

# -----------------------------------------------------------------------------
# the official TuSimple metric, on hand-computed cases


def test_line_accuracy_and_angle_by_hand():
    ys = [100, 200, 300, 400]
    assert tusimple_angle([10, 10, 10, 10], ys) == 0.0
    assert tusimple_angle([100, 200, 300, 400], ys) == pytest.approx(math.pi / 4)  # x = y: 45 degrees
    assert tusimple_angle([-2, -2, 5, -2], ys) == 0.0                              # one point
    # |diff| < 20 at rows 0, 1; row 2 diff 20 is not < 20; row 3 both absent (-100 vs -100) counts
    assert tusimple_line_accuracy([10, 29, 30, -2], [10, 10, 10, -2], 20) == pytest.approx(3 / 4)
    # a prediction where the gt is absent is wrong, and vice versa
    assert tusimple_line_accuracy([10, 10, 10, 10], [10, 10, -2, -2], 20) == pytest.approx(2 / 4)


def test_bench_threshold_is_angle_adjusted():
    ys = list(range(10, 110, 10))
    gt_vertical = [[500.0] * 10]
    assert tusimple_bench([[519.0] * 10], gt_vertical, ys)[:3] == (1.0, 0.0, 0.0)
    assert tusimple_bench([[521.0] * 10], gt_vertical, ys)[:3] == (0.0, 1.0, 1.0)  # FP and FN
    gt_diag = [[float(y) + 300 for y in ys]]  # 45 degrees: threshold 20 / cos(45) = 28.28
    assert tusimple_bench([[y + 325.0 for y in ys]], gt_diag, ys)[:3] == (1.0, 0.0, 0.0)
    assert tusimple_bench([[y + 329.0 for y in ys]], gt_diag, ys)[0] == 0.0


def test_bench_point_threshold_fp_fn_by_hand():
    ys = list(range(10, 110, 10))
    gt = [[100.0] * 10, [600.0] * 10]
    nine = [100.0] * 9 + [300.0]   # 9 / 10 rows within 20 px: matched (>= 0.85)
    eight = [600.0] * 8 + [900.0, 900.0]  # 8 / 10: not matched
    acc, fp, fn, matched = tusimple_bench([nine, eight], gt, ys)
    assert (acc, fp, fn, matched) == (pytest.approx((0.9 + 0.8) / 2), 0.5, 0.5, 1)
    spurious = [1000.0] * 10
    acc, fp, fn, matched = tusimple_bench([gt[0], gt[1], spurious], gt, ys)
    assert (acc, fp, fn, matched) == (1.0, pytest.approx(1 / 3), 0.0, 2)
    assert tusimple_bench([gt[0]] * 5, gt, ys) == (0.0, 0.0, 1.0, 0)  # > #gt + 2 predictions
    assert tusimple_bench([], gt, ys) == (0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError):
        tusimple_bench([[1.0] * 9], gt, ys)


def test_bench_five_gt_lanes_drop_the_worst():
    ys = list(range(10, 110, 10))
    gt = [[100.0 + 200 * i] * 10 for i in range(5)]
    half = gt[4][:5] + [-2.0] * 5  # lane 4 found on half its rows: accuracy 0.5 < 0.85, an FN and an FP
    acc, fp, fn, matched = tusimple_bench(gt[:4] + [half], gt, ys)
    # accuracies [1, 1, 1, 1, 0.5]: the worst is dropped, /4 -> 1.0 (kept: 4.5 / 4); one FN forgiven -> 0
    assert (acc, fp, fn, matched) == (1.0, pytest.approx(1 / 5), 0.0, 4)
    # the drop takes the worst lane, not the last: here lane 0 is the half-found one
    acc, _, _, _ = tusimple_bench([gt[0][:5] + [-2.0] * 5] + gt[1:], gt, ys)
    assert acc == 1.0


def test_all_absent_gt_lane_counts_as_in_laneeval():
    """LaneEval keeps every gt lane of the label file. An all -2 gt lane has angle 0 (threshold 20) and, with
    absent rows at -100 on both sides, a prediction's accuracy against it = its share of absent rows:
    here the one prediction (a full lane) scores 0 on it -> an FN. acc = (1 + 0) / 2, fn = 1/2, fp = 0."""
    ys = list(range(10, 110, 10))
    gt = [[100.0] * 10, [-2.0] * 10]
    assert tusimple_bench([[100.0] * 10], gt, ys) == (pytest.approx(0.5), 0.0, 0.5, 1)
    # a prediction absent on 9 of 10 rows matches it (0.9 >= 0.85)
    assert tusimple_bench([[100.0] * 10, [-2.0] * 9 + [500.0]], gt, ys) == (pytest.approx(0.95), 0.0, 0.0, 2)
    m = tusimple_metrics([[[100.0] * 10]], [gt], [ys])
    # CLRNet's F1 from FP 0, FN 0.5: tp = 1, P = 1, R = 1 / 1.5
    assert (m["tusimple_acc"], m["fn"], m["f1"]) == (pytest.approx(0.5), 0.5, pytest.approx(0.8))


def test_dataset_metrics_and_f1_by_hand():
    ys = list(range(10, 110, 10))
    gt_a, gt_b = [[100.0] * 10, [600.0] * 10], [[300.0] * 10]
    preds = [[gt_a[0], gt_a[1]], [[800.0] * 10, [-2.0] * 10]]  # image 2: one wrong lane, one empty (dropped)
    m = tusimple_metrics(preds, [gt_a, gt_b], [ys, ys])
    assert m["tusimple_acc"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["fp"] == pytest.approx((0 + 1.0) / 2) and m["fn"] == pytest.approx((0 + 1.0) / 2)
    # CLRNet's F1 from the dataset FP 0.5, FN 0.5: tp = 0.5, P = R = 0.5
    assert m["f1"] == pytest.approx(0.5)

# -----------------------------------------------------------------------------
# data: synthetic scenes and the TuSimple reader


def test_synthetic_scenes_are_seeded_tusimple_form():
    a = lane_synthetic_sample(sample_rng(7, "train", 3), 160, 96)
    b = lane_synthetic_sample(sample_rng(7, "train", 3), 160, 96)
    c = lane_synthetic_sample(sample_rng(7, "val", 3), 160, 96)
    assert torch.equal(a["image"], b["image"]) and a["lanes"] == b["lanes"]
    assert a["lanes"] != c["lanes"]
    assert a["image"].shape == (3, 96, 160) and 0 <= float(a["image"].min()) <= float(a["image"].max()) <= 1
    counts = set()
    for i in range(20):
        s = lane_synthetic_sample(sample_rng(7, "train", i), 80, 48)
        counts.add(len(s["lanes"]))
        assert s["h_samples"] == HS
        for lane in s["lanes"]:
            assert len(lane) == len(HS) and sum(x >= 0 for x in lane) >= 6
            assert all(x == -2 or 0 <= x < 1280 for x in lane)
            valid = [i for i, x in enumerate(lane) if x >= 0]
            assert valid == list(range(valid[0], valid[-1] + 1))  # one contiguous run per lane
    assert counts <= {2, 3, 4} and len(counts) >= 2


def test_difficulty_knobs_change_the_image_not_the_labels():
    """Occlusion, shadows, noise, lighting and dashes are drawn after the labels: same lanes, other pixels.
    Camera tilt moves the horizon, so it changes the labels; tilt=0 pins it (every lane starts at the
    same band below a horizon at 290 label px)."""
    base = lane_synthetic_sample(sample_rng(7, "train", 5), 80, 48)
    for knob in (dict(max_cars=3), dict(max_shadows=2), dict(noise=0.04), dict(lighting=1.0), dict(dash_freq=0.2)):
        s = lane_synthetic_sample(sample_rng(7, "train", 5), 80, 48, **knob)
        assert s["lanes"] == base["lanes"], knob
    hard = lane_synthetic_sample(sample_rng(7, "train", 5), 80, 48, max_cars=3, max_shadows=2, noise=0.04,
                                 lighting=1.0, dash_freq=0.2)
    assert not torch.equal(hard["image"], base["image"])
    for i in range(10):  # tilt=0: the first labelled row lies 12..45 px below the fixed horizon (+ row rounding)
        s = lane_synthetic_sample(sample_rng(7, "train", i), 80, 48, tilt=0.0)
        for lane in s["lanes"]:
            top = HS[[x >= 0 for x in lane].index(True)]
            assert 290 + 12 <= top < 290 + 45 + 10


def test_seg_target_by_hand():
    """A vertical lane in slot 2 at x=640 from y=180 to 360 on a 40x24 grid (32 label px per column,
    30 per row) marks column 20, rows 6..12; an isolated point in slot 0 marks its own cell; all else 0."""
    hs = [180, 360, 540, 600]
    slots = [[-2, -2, -2, 100.0], None, [640.0, 640.0, -2, -2], None]
    t = lane_seg_target(slots, hs, 40, 24)
    assert t.shape == (24, 40) and t.dtype == np.int64
    want = np.zeros((24, 40), dtype=np.int64)
    want[6:13, 20] = 3
    want[20, 3] = 1  # x 100 / 32 = 3.1, y 600 / 30 = 20
    assert (t == want).all()
    # a slanted lane is continuous: every grid row between its ends has a marked cell
    t = lane_seg_target([None, [100.0, 600.0, 1100.0, -2], None, None], hs, 40, 24)
    rows = np.nonzero((t == 2).any(1))[0]
    assert rows.min() == 6 and rows.max() == 18 and len(rows) == 13
    assert len(np.unique(np.nonzero(t == 2)[1])) > 25  # and every column it crosses


def test_tusimple_reader_on_written_files(tmp_path):
    clip = tmp_path / "clips" / "0313-1" / "60"
    clip.mkdir(parents=True)
    Image.new("RGB", (1280, 720), (90, 90, 90)).save(clip / "20.jpg")
    hs = [240, 250, 260, 270]
    lines = [dict(lanes=[[-2, 632, 625, 617], [719, 734, 748, -2]], h_samples=hs, raw_file="clips/0313-1/60/20.jpg"),
             dict(lanes=[[-2, -2, -2, -2]], h_samples=hs, raw_file="clips/0313-1/60/20.jpg")]
    (tmp_path / "label_data_0313.json").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    entries = tusimple_read_labels(str(tmp_path), "label_data_0313.json")
    assert len(entries) == 2 and entries[0]["h_samples"] == hs
    s = tusimple_sample(entries[0], str(tmp_path), 160, 96)
    assert s["image"].shape == (3, 96, 160) and abs(float(s["image"].mean()) - 90 / 255) < 0.01
    assert s["lanes"] == [[-2, 632, 625, 617], [719, 734, 748, -2]]  # labels keep the 1280x720 frame
    assert lane_sort(entries[1]["lanes"]) == []
    tok = LaneTokenizer()
    for k, lane in enumerate(lane_sort(s["lanes"])):
        xs, ok = tok.decode(tok.encode(lane, k), len(hs))
        assert ok and max_err(xs, lane) <= 3.2 + 1e-9
    (tmp_path / "bad.json").write_text('{"lanes": [[1, 2]], "h_samples": [1], "raw_file": "x"}\n')
    with pytest.raises(ValueError, match="bad.json:1"):
        tusimple_read_labels(str(tmp_path), "bad.json")
    with pytest.raises(FileNotFoundError):
        tusimple_read_labels(str(tmp_path), "missing.json")
    assert len(tusimple_read_labels(str(tmp_path), "label_data_0313.json", lane_row_grid(10))) == 2
    good = dict(lanes=[[-2, 632, 625, 617]], h_samples=hs, raw_file="clips/0313-1/60/20.jpg")
    bad_lines = {"[1, 2, 3]": "not a TuSimple label line", json.dumps({**good, "lanes": None}): "lanes must be",
                 json.dumps({**good, "h_samples": [240, 250, 260, 265]}): "row 265 is not on the ROW grid",
                 json.dumps({**good, "h_samples": [240, 250, 250, 270]}): "repeats a row",
                 json.dumps({**good, "raw_file": "clips/none.jpg"}): "image clips/none.jpg not found"}
    for line, msg in bad_lines.items():  # each stops the run at reading, naming the line, before any training
        (tmp_path / "bad.json").write_text(line + "\n")
        with pytest.raises((model.InputError, FileNotFoundError), match="bad.json:1: .*" + msg):
            tusimple_read_labels(str(tmp_path), "bad.json", lane_row_grid(10))
    img = lane_draw(s["image"], hs, gt=s["lanes"], pred=s["lanes"], scale=2)
    assert img.size == (320, 192) and img.getpixel((int(632 / 4), int(250 / 3.75)))[0] == 255  # red on top

# -----------------------------------------------------------------------------
# end to end: the script trains (loss falls), evaluates with decoding, writes results/PNG/ckpt, resumes

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--conv_width=8", "--batch_size=4", "--lr=3e-3",
        "--warmup_steps=5", "--log_interval=5", "--n_eval=8", "--n_eval_tf=4", "--eval_batch=8",
        "--n_vis=4", "--torch_threads=1", "--h_step=40", "--max_train_seconds=0"]


def run(args):
    r = run_script("train_lanelm.py", args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_train_eval_resume_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    log = run(TINY + ["--max_steps=40", "--eval_interval=40", "--out_dir=" + out])
    losses = [float(x) for x in re.findall(r"step \d+/\d+ \| loss ([\d.]+)", log)]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], log
    aux = [float(x) for x in re.findall(r"aux seg ([\d.]+)", log)]  # the dense encoder loss falls too
    assert len(aux) == 8 and aux[-1] < 0.8 * aux[0], log
    # the eval prints two lines: the targets, then the diagnostics that explain them
    lines = log.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("eval step 40 |")]
    assert len(at) == 1, log
    assert re.fullmatch(r"eval step 40 \| tusimple_acc \S+ \(>= 0.95\) \| fp \S+ \(<= 0.05\) \| fn \S+ \(<= 0.05\) "
                        r"\| (met|NOT met)", lines[at[0]]), lines[at[0]]
    assert re.fullmatch(r"  f1 \S+ \| tf_token_acc \S+ \| invalid_seq \S+ \| train_loss \S+ \| 8 held-out images",
                        lines[at[0] + 1]), lines[at[0] + 1]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["recipe"] == "lanelm" and res["step"] == 40 and res["n_eval"] == 8
    for k in ("tusimple_acc", "fp", "fn", "f1", "tf_token_acc", "invalid_seq"):
        assert k in res["metrics"]
    assert res["targets"]["tusimple_acc"] == [">=", 0.95]
    assert os.path.exists(os.path.join(out, "val_00040.png"))
    assert os.path.exists(os.path.join(out, "ckpt", "model.safetensors"))
    log = run(TINY + ["--max_steps=50", "--eval_interval=50", "--init_from=resume", "--out_dir=" + out])
    assert "step 45/50" in log and "step 5/50" not in log
    assert json.load(open(os.path.join(out, "results.json")))["step"] == 50
    log = run(["--eval_only=True", "--init_from=" + os.path.join(out, "ckpt"), "--out_dir=" + str(tmp_path / "ev"),
               "--n_eval=4", "--n_eval_tf=2", "--torch_threads=1", "--n_layer=3", "--n_vis=0"])
    assert "from checkpoint: n_layer=1" in log  # the checkpoint's model shape wins
    assert json.load(open(tmp_path / "ev" / "results.json"))["n_eval"] == 4
    assert not list((tmp_path / "ev").glob("*.png"))  # n_vis=0: no picture, no crash


def copy_each_checkpoint(monkeypatch):
    """Every checkpoint a run saves is also kept as ckpt_step<N>: mid-run states to resume from."""
    save = checkpoint.save_checkpoint

    def save_and_copy(ckpt_dir, m, optimizer=None, meta=None):
        save(ckpt_dir, m, optimizer, meta)
        shutil.copytree(ckpt_dir, f"{ckpt_dir}_step{meta['step']}")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_and_copy)  # the script imports it at start


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "ckpt", "model.safetensors"))


def test_resume_and_eval_only_are_exact_with_batchnorm(tmp_path, monkeypatch):
    """conv_norm='batch' (the TuSimple config's): a run stopped at step 6 and resumed equals the straight
    12-step run, loss lines and every tensor bit for bit, BatchNorm running statistics included (start-up
    must not run a train-mode forward on the loaded weights); eval_only scores the checkpoint unchanged, at
    its step. The training clock (train_seconds: time budget, LR schedule) continues from the checkpoint."""
    copy_each_checkpoint(monkeypatch)
    args = TINY + ["--conv_norm=batch", "--max_steps=12", "--eval_interval=6", "--log_interval=3", "--n_vis=0",
                   "--n_eval=2", "--n_eval_tf=2"]
    straight, resumed, clock = (str(tmp_path / d) for d in ("straight", "resumed", "clock"))
    log = run(args + ["--out_dir=" + straight])
    shutil.copytree(straight + "/ckpt_step6", resumed + "/ckpt")
    log_resumed = run(args + ["--init_from=resume", "--out_dir=" + resumed])
    loss_lines = lambda text: re.findall(r"step (\d+)/12 \| loss ([\d.]+)", text)  # noqa: E731
    assert loss_lines(log_resumed) == loss_lines(log)[2:] and len(loss_lines(log)) == 4, log_resumed
    a, b = weights(straight), weights(resumed)
    assert any("running_mean" in k for k in a) and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ev = str(tmp_path / "ev")
    log_ev = run(["--eval_only=True", "--init_from=" + straight + "/ckpt", "--out_dir=" + ev, "--n_eval=2",
                  "--n_eval_tf=2", "--n_vis=0", "--torch_threads=1"])
    assert "step 1/" not in log_ev and not os.path.exists(ev + "/ckpt")  # scores only: no training, no save
    res, meta = json.load(open(ev + "/results.json")), json.load(open(straight + "/ckpt/meta.json"))
    assert res["step"] == 12 and res["train_seconds"] == round(meta["train_seconds"], 1) > 0
    # the same scores as the straight run's own last eval, the teacher-forced loss to the last bit: start-up
    # changed nothing in the loaded model (BatchNorm's running statistics included)
    end = json.load(open(straight + "/results.json"))["metrics"]
    assert {k: v for k, v in end.items() if k != "train_loss"} == res["metrics"]
    evals = [json.loads(line) for line in open(straight + "/evals.jsonl")]
    assert [e["step"] for e in evals] == [6, 12] and evals[-1]["metrics"] == end  # one record per eval
    # the clock: a checkpoint that has used 1000 s of a 1000 s budget stops after one more step
    shutil.copytree(straight + "/ckpt_step6", clock + "/ckpt")
    meta6 = json.load(open(clock + "/ckpt/meta.json"))
    json.dump({**meta6, "train_seconds": 1000.0}, open(clock + "/ckpt/meta.json", "w"))
    log = run(args + ["--init_from=resume", "--max_train_seconds=1000", "--out_dir=" + clock])
    assert "stopping at step 7/12" in log and json.load(open(clock + "/results.json"))["train_seconds"] >= 1000
    assert "step 7/12 | loss" in log  # the last step is logged, checkpointed and evaluated


def write_tusimple(root):
    """A TuSimple-form dataset: clips as 1280x720 JPEGs, 0313-style labels (rows 240..710) next to 160..710
    ones, absent points as -2 and other negatives, an all -2 lane; 3 train and 2 val images."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        clip = "0313-1" if i % 2 == 0 else "0531"
        path = f"clips/{clip}/{i}/20.jpg"
        os.makedirs(root / os.path.dirname(path))
        Image.fromarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)).save(root / path)
        hs = list(range(240 if clip == "0313-1" else 160, 720, 10))
        lanes = [[x - 0.6 * (y - 300) if y >= 300 else -2 for y in hs] for x in (300, 600, 900)]
        lines.append(dict(lanes=lanes + [[-2] * len(hs), [-5.0] * len(hs)], h_samples=hs, raw_file=path))
    (root / "train.json").write_text("".join(json.dumps(l) + "\n" for l in lines[:3]))
    (root / "val.json").write_text("".join(json.dumps(l) + "\n" for l in lines[3:]))


def test_tusimple_form_dataset_end_to_end(tmp_path):
    """The TuSimple config's path on written files: trains, decodes on the row grid at each image's rows,
    scores each val image once (n_eval clamped and recorded); --overfit=True without a 4-lane image is a
    one-line error."""
    write_tusimple(tmp_path)
    args = ["config/lanelm_tusimple.py", "--data_root=" + str(tmp_path), "--train_labels=train.json",
            "--val_labels=val.json", "--compile=False", "--img_w=160", "--img_h=96", "--max_lanes=4"] + TINY + [
            "--h_step=10", "--max_steps=2", "--n_vis=0", "--n_eval=50", "--out_dir=" + str(tmp_path / "run")]
    log = run(args)
    assert "n_eval=50 > the 2 val images" in log and "2 held-out images" in log
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["n_eval"] == 2 and res["config"]["n_eval"] == 2 and 0 <= res["metrics"]["fn"] <= 1
    r = run_script("train_lanelm.py", args + ["--overfit=True"])
    assert r.returncode == 1
    assert r.stderr.strip() == "error: overfit=True needs a training image with 4 lanes; none in the first 3"


def test_culane_form_dataset_end_to_end(tmp_path):
    """The CULane config's path on a CULane-format split written here (1640x590 images, .lines.txt beside each,
    list/train_gt.txt, list/test.txt, list/test_split/): trains, decodes on CULane's row grid, and reports
    F1@50 (the target), F1@75, mF1 and per-scenario F1@50 from the official metric."""
    write_culane(tmp_path, n_train=3, n_test=2)
    out = tmp_path / "run"
    log = run(["config/lanelm_culane.py", "--data_root=" + str(tmp_path), "--compile=False", "--img_w=160",
               "--img_h=96"] + TINY + ["--h_step=10", "--max_steps=3", "--n_eval=50", "--out_dir=" + str(out)])
    assert "n_eval=50 > the 2 val images" in log
    head = [line for line in log.splitlines() if line.startswith("eval step 3 |")]
    assert len(head) == 1 and re.fullmatch(r"eval step 3 \| f1_50 \S+ \(>= 0.8\) \| (met|NOT met)", head[0]), log
    assert re.search(r"\n  f1_75 \S+ \| mf1 \S+ \| precision \S+ \| recall \S+ \| tf_token_acc", log), log
    res = json.load(open(out / "results.json"))
    assert res["n_eval"] == 2 and res["targets"] == {"f1_50": [">=", 0.8]}
    for k in ("f1_50", "f1_75", "mf1", "f1_50_normal", "f1_50_night"):
        assert 0 <= res["metrics"][k] <= 1
    assert res["metrics"]["fp_normal"] >= 0 and res["metrics"]["fp_night"] >= 0
    assert os.path.exists(out / "val_00003.png")


@pytest.mark.parametrize("arg, msg", [("--tokenization=foo", "tokenization must be one of"),
                                      ("--max_lanes=1", "max_lanes must be >= 2"),
                                      ("--h_step=0", "h_step must be > 0"),
                                      ("--h_step=5", "gives a row grid of 112 rows > max_rows=56"),
                                      ("--n_embd=30", "n_embd (30) must be a multiple of 4")])
def test_bad_config_is_a_one_line_error(tmp_path, arg, msg):
    r = run_script("train_lanelm.py", ["--torch_threads=1", "--out_dir=" + str(tmp_path), arg])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert msg in r.stderr
