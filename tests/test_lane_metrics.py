"""Lane metrics against their official scorers: TuSimple's evaluate/lane.py (accuracy / FP / FN) with CLRNet's
F1, and CULane's SCNN tools/lane_evaluation (spline, 30 px raster IoU, Hungarian matching, F1 at IoU 0.5 /
0.75, mF1): worked cases, then differential tests against plain re-implementations of the official code on
thousands of random images. Also the TuSimple and CULane readers on files written here, including the
malformed inputs each refuses in one line."""
import itertools
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from data_lanelm import (CULANE_IOU_THRESHOLDS, culane_counts, culane_from_grid, culane_ious, culane_lane_mask,
                         culane_metrics, culane_read_categories, culane_read_list, culane_row_grid, culane_sample,
                         culane_spline, culane_to_grid, lane_assignment, lane_f1, tusimple_bench, tusimple_f1,
                         tusimple_metrics, tusimple_read_labels)
from model import InputError

# -----------------------------------------------------------------------------
# plain re-implementations of the official code, line by line, as references


def ref_lane_eval_bench(pred, gt, y_samples):
    """TuSimple evaluate/lane.py LaneEval.bench (running_time 0), its LinearRegression as a least-squares fit."""
    if len(gt) + 2 < len(pred):
        return 0., 0., 1.
    angles = []
    for x_gts in gt:
        xs, ys = np.array(x_gts, dtype=float), np.array(y_samples, dtype=float)
        xs, ys = xs[xs >= 0], ys[xs >= 0]
        angles.append(np.arctan(np.polyfit(ys, xs, 1)[0]) if len(xs) > 1 else 0)
    threshs = [20 / np.cos(a) for a in angles]
    line_accs, fn, matched = [], 0., 0.
    for x_gts, thresh in zip(gt, threshs):
        accs = []
        for x_preds in pred:
            p = np.array([v if v >= 0 else -100 for v in x_preds])
            g = np.array([v if v >= 0 else -100 for v in x_gts])
            accs.append(np.sum(np.where(np.abs(p - g) < thresh, 1., 0.)) / len(g))
        max_acc = np.max(accs) if len(accs) > 0 else 0.
        if max_acc < 0.85:
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
    return s / max(min(4.0, len(gt)), 1.), fp / len(pred) if len(pred) > 0 else 0., fn / max(min(len(gt), 4.), 1.)


def ref_clrnet_f1(fp, fn):
    """clrnet/utils/tusimple_metric.py bench_one_submit, from the dataset-level FP and FN."""
    tp = 1 - fp
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def ref_spline(points, times=50):
    """SCNN src/spline.cpp splineInterpTimes + cal_fun, scalar, as written (float32 points in and out)."""
    pts = [(float(np.float32(x)), float(np.float32(y))) for x, y in points]
    n = len(pts)
    h = [math.sqrt((pts[i + 1][0] - pts[i][0]) ** 2 + (pts[i + 1][1] - pts[i][1]) ** 2) for i in range(n - 1)]
    A, B, C, Dx, Dy = [0.0] * (n - 2), [0.0] * (n - 2), [0.0] * (n - 2), [0.0] * (n - 2), [0.0] * (n - 2)
    for i in range(n - 2):
        A[i], B[i], C[i] = h[i], 2 * (h[i] + h[i + 1]), h[i + 1]
        Dx[i] = 6 * ((pts[i + 2][0] - pts[i + 1][0]) / h[i + 1] - (pts[i + 1][0] - pts[i][0]) / h[i])
        Dy[i] = 6 * ((pts[i + 2][1] - pts[i + 1][1]) / h[i + 1] - (pts[i + 1][1] - pts[i][1]) / h[i])
    C[0], Dx[0], Dy[0] = C[0] / B[0], Dx[0] / B[0], Dy[0] / B[0]
    for i in range(1, n - 2):
        tmp = B[i] - A[i] * C[i - 1]
        C[i] = C[i] / tmp
        Dx[i] = (Dx[i] - A[i] * Dx[i - 1]) / tmp
        Dy[i] = (Dy[i] - A[i] * Dy[i - 1]) / tmp
    Mx, My = [0.0] * n, [0.0] * n
    Mx[n - 2], My[n - 2] = Dx[n - 3], Dy[n - 3]
    for i in range(n - 4, -1, -1):
        Mx[i + 1] = Dx[i] - C[i] * Mx[i + 2]
        My[i + 1] = Dy[i] - C[i] * My[i + 2]
    res = []
    for i in range(n - 1):
        coef = []
        for P, M in ((0, Mx), (1, My)):
            a = pts[i][P]
            b = (pts[i + 1][P] - pts[i][P]) / h[i] - (2 * h[i] * M[i] + h[i] * M[i + 1]) / 6
            coef.append((a, b, M[i] / 2, (M[i + 1] - M[i]) / (6 * h[i])))
        t = h[i] / times * np.arange(times)
        res += list(zip(*[a + b * t + c * t ** 2 + d * t ** 3 for a, b, c, d in coef]))
    res.append(pts[-1])
    return np.array(res, dtype=np.float32).tolist()  # Point2f


def ref_mask(points, width, shape):
    """The lane on a blank canvas, pixel by pixel in a window around each segment: cv::line's filled band
    (half-width width/2 + half a pixel along the major axis, half a pixel past each end) and round caps of
    radius width/2, between the spline samples rounded half-to-even (cvRound)."""
    H, W = shape
    r = width / 2
    pts = ref_spline(points) if len(points) > 2 else [tuple(map(float, p)) for p in points]
    v = np.rint(np.array(pts, dtype=float)).tolist()
    v = [p for i, p in enumerate(v) if i == 0 or p != v[i - 1]]  # a repeated point draws nothing new
    a, b = np.array(v[:-1] or v), np.array(v[1:] or v)  # one point: a dot
    lo = np.floor(np.minimum(a, b) - r - 2)
    size = (np.ceil(np.abs(b - a)).max(0) + 2 * r + 5).astype(int)  # one window size fits every segment
    ys, xs = np.mgrid[0:size[1], 0:size[0]].astype(float)
    xs, ys = xs[None] + lo[:, 0, None, None], ys[None] + lo[:, 1, None, None]
    ax, ay, bx, by = (c[:, None, None] for c in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    on = ((xs - ax) ** 2 + (ys - ay) ** 2 <= r * r + 1e-6) | ((xs - bx) ** 2 + (ys - by) ** 2 <= r * r + 1e-6)
    length = np.hypot(bx - ax, by - ay)
    ux, uy = (bx - ax) / np.maximum(length, 1e-12), (by - ay) / np.maximum(length, 1e-12)
    half = 0.5 * np.maximum(np.abs(ux), np.abs(uy))
    along, perp = (xs - ax) * ux + (ys - ay) * uy, np.abs((ys - ay) * ux - (xs - ax) * uy)
    on |= (length > 0) & (perp <= r + half + 1e-6) & (along >= -half - 1e-6) & (along <= length + half + 1e-6)
    on &= (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
    mask = np.zeros(shape, dtype=bool)
    mask[ys[on].astype(int), xs[on].astype(int)] = True
    return mask


def ref_km_match(sim):
    """SCNN include/hungarianGraph.hpp (the KM algorithm, edges within 1e-2 of tight taken as tight) as
    Counter::makeMatch calls it: the smaller side on the left. -> anno_match (gt i -> pred j or -1)."""
    m, n = len(sim), len(sim[0])
    swap = m > n
    mat = [[sim[j][i] for j in range(m)] for i in range(n)] if swap else [row[:] for row in sim]
    L, R = len(mat), len(mat[0])
    left_match, right_match, right_w = [-1] * L, [-1] * R, [0.0] * R
    left_w = [max(row + [-1e5]) for row in mat]

    def dfs(u, left_used, right_used):
        left_used[u] = True
        for v in range(R):
            if not right_used[v] and abs(left_w[u] + right_w[v] - mat[u][v]) < 1e-2:
                right_used[v] = True
                if right_match[v] == -1 or dfs(right_match[v], left_used, right_used):
                    right_match[v], left_match[u] = u, v
                    return True
        return False

    for u in range(L):
        while True:
            left_used, right_used = [False] * L, [False] * R
            if dfs(u, left_used, right_used):
                break
            d = min(left_w[i] + right_w[j] - mat[i][j] for i in range(L) if left_used[i]
                    for j in range(R) if not right_used[j])
            for i in range(L):
                if left_used[i]:
                    left_w[i] -= d
            for j in range(R):
                if right_used[j]:
                    right_w[j] += d
    return right_match if swap else left_match


def ref_count_im_pair(gt, pred, width, shape, thresholds):
    """SCNN counter.cpp count_im_pair with lane_compare.cpp's IoU -> (tp, fp, fn) per threshold."""
    if not gt or not pred:
        return [(0, len(pred), len(gt))] * len(thresholds)
    masks = lambda lanes: [ref_mask(l, width, shape) if len(l) >= 2 else None for l in lanes]  # noqa: E731
    gm, pm = masks(gt), masks(pred)
    sim = [[0.0 if a is None or b is None else float((a & b).sum() / max((a | b).sum(), 1)) for b in pm] for a in gm]
    match = ref_km_match(sim)
    tps = [sum(1 for i, j in enumerate(match) if j >= 0 and sim[i][j] > thr) for thr in thresholds]
    return [(tp, len(pred) - tp, len(gt) - tp) for tp in tps]

# -----------------------------------------------------------------------------
# TuSimple: worked cases


ROWS5 = [200, 210, 220, 230, 240]


def test_tusimple_f1_is_clrnets():
    assert tusimple_f1(0.02, 0.03) == pytest.approx(0.97512, abs=1e-5)
    assert tusimple_f1(0.02, 0.03) == pytest.approx(ref_clrnet_f1(0.02, 0.03), abs=1e-15)
    assert tusimple_f1(0.0, 0.0) == 1.0 and tusimple_f1(1.0, 0.0) == 0.0
    assert tusimple_f1(0.0, 1.0) == pytest.approx(2 / 3)  # CLRNet's tp = 1 - FP: R = 1 / (1 + FN), never 0
    # 1 image, 4 gt lanes, 3 predictions all matched: FP 0, FN 1/4 -> P 1, R 1/1.25 -> F1 8/9
    gt = [[100.0 + 300 * k] * 5 for k in range(4)]
    m = tusimple_metrics([gt[:3]], [gt], [ROWS5])
    assert (m["fp"], m["fn"], m["f1"]) == (0.0, 0.25, pytest.approx(8 / 9))


def test_tusimple_one_prediction_matching_two_lanes_keeps_f1_at_most_one():
    """LaneEval matches each gt lane to its best prediction, so one prediction can match two gt lanes 5 px
    apart: FP = (1 - 2) / 1 = -1, as the official code reports it. CLRNet's formula would then give
    P = 2 and F1 = 4/3; here the negative FP counts as 0 in F1: 1.0."""
    pred, gt = [[100.0] * 5], [[100.0] * 5, [105.0] * 5]
    assert ref_lane_eval_bench(pred, gt, ROWS5) == (1.0, -1.0, 0.0)
    m = tusimple_metrics([pred], [gt], [ROWS5])
    assert (m["tusimple_acc"], m["fp"], m["fn"]) == (1.0, -1.0, 0.0)
    assert ref_clrnet_f1(-1.0, 0.0) == pytest.approx(4 / 3) and m["f1"] == 1.0


def test_tusimple_metrics_wants_one_prediction_list_per_image():
    gt = [[100.0] * 5]
    with pytest.raises(InputError, match=r"^tusimple_metrics: 1 predictions for 2 images \(2 h_samples lists\)"):
        tusimple_metrics([gt], [gt, gt], [ROWS5, ROWS5])
    with pytest.raises(InputError, match="3 predictions for 2 images"):
        tusimple_metrics([gt] * 3, [gt, gt], [ROWS5, ROWS5])

# -----------------------------------------------------------------------------
# TuSimple reader: malformed values and paths, one line each


def test_tusimple_reader_refuses_nan_infinity_and_paths_outside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    Image.new("RGB", (64, 36)).save(root / "clips" / "a.jpg")
    Image.new("RGB", (64, 36)).save(tmp_path / "outside.jpg")
    good = dict(lanes=[[-2, 632, 625, 617]], h_samples=[240, 250, 260, 270], raw_file="clips/a.jpg")
    assert len(tusimple_read_labels(str(root), _write(root, [good]))) == 1
    cases = {'{"lanes": [[-2, NaN, 625, 617]], "h_samples": [240, 250, 260, 270], "raw_file": "clips/a.jpg"}': "nan",
             '{"lanes": [[-2, Infinity, 625, 617]], "h_samples": [240, 250, 260, 270], "raw_file": "clips/a.jpg"}':
             "inf",
             '{"lanes": [[-2, 1, 625, 617]], "h_samples": [240, -Infinity, 260, 270], "raw_file": "clips/a.jpg"}':
             "-inf",
             json.dumps({**good, "raw_file": str(tmp_path / "outside.jpg")}): "outside the data root",
             json.dumps({**good, "raw_file": "../outside.jpg"}): "outside the data root",
             json.dumps({**good, "raw_file": "clips/../../outside.jpg"}): "outside the data root"}
    for line, msg in cases.items():
        (root / "bad.json").write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(InputError, match=r"bad.json:2: .*" + msg) as err:
            tusimple_read_labels(str(root), "bad.json")
        assert "\n" not in str(err.value)


def _write(root, lines, name="labels.json"):
    (root / name).write_text("".join(json.dumps(l) + "\n" for l in lines))
    return name

# -----------------------------------------------------------------------------
# TuSimple: differential test against lane.py + CLRNet's F1


def random_tusimple_image(rng, ys):
    """2-6 gt lanes (some with gaps, some all absent), predictions: noisy copies (some > 20 px off, some cut
    short), missing lanes, extra lanes, sometimes more than #gt + 2 of them."""
    n_rows = len(ys)
    gt = []
    for _ in range(rng.integers(2, 7)):
        x = rng.uniform(0, 1280) + rng.uniform(-1.5, 1.5) * (np.array(ys) - ys[0])
        start, end = sorted(rng.integers(0, n_rows + 1, 2))
        lane = np.where((np.arange(n_rows) >= start) & (np.arange(n_rows) < end) & (x >= 0) & (x < 1280), x, -2)
        if rng.random() < 0.3:  # a gap
            g = rng.integers(0, n_rows)
            lane[g:g + rng.integers(1, 5)] = -2
        gt.append(np.round(lane, 1).tolist())
    pred = []
    for lane in gt:
        if rng.random() < 0.8:
            p = np.array(lane) + rng.normal(0, rng.choice([3, 12, 30]), n_rows)
            if rng.random() < 0.3:
                p[: rng.integers(0, n_rows)] = -2
            pred.append(np.where(np.array(lane) >= 0, p, -2).tolist())
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        pred.append((rng.uniform(0, 1280) + np.zeros(n_rows)).tolist())
    rng.shuffle(pred)
    return pred, gt


def test_tusimple_matches_lane_py_and_clrnet_on_random_images():
    """2,400 random images: per image accuracy / FP / FN equal to lane.py's; per 12-image dataset F1 equal
    to CLRNet's, a negative dataset FP taken as 0 (the one deliberate difference)."""
    rng = np.random.default_rng(0)
    ys = list(range(160, 720, 20))
    clamped = 0
    for _ in range(200):
        images = [random_tusimple_image(rng, ys) for _ in range(12)]
        refs = []
        for pred, gt in images:
            kept = [p for p in pred if any(x >= 0 for x in p)]  # the deliberate drop of all-absent predictions
            refs.append(ref_lane_eval_bench(kept, gt, ys))
            ours = tusimple_bench(kept, gt, ys)[:3]
            assert ours == pytest.approx(refs[-1], abs=1e-12), (pred, gt)
        m = tusimple_metrics([p for p, _ in images], [g for _, g in images], [ys] * 12)
        acc, fp, fn = np.mean(refs, axis=0)
        assert (m["tusimple_acc"], m["fp"], m["fn"]) == pytest.approx((acc, fp, fn), abs=1e-12)
        if fp < 0:  # one prediction matched two gt lanes more often than others were missed: FP as 0
            clamped += 1
        assert m["f1"] == pytest.approx(ref_clrnet_f1(max(fp, 0), fn), abs=1e-12) if fp < 1 else m["f1"] == 0
        assert 0 <= m["f1"] <= 1
    assert 0 < clamped < 40

# -----------------------------------------------------------------------------
# CULane: worked cases


def vertical(x, top=300, bottom=590):
    return [(float(x), float(y)) for y in range(bottom, top - 1, -10)]


def test_culane_worked_cases():
    """Two vertical lanes 590..300: 5 px apart IoU 0.7196 (a TP at 0.5, not at 0.75), 15 px apart 0.3437 (an
    FP and an FN). OpenCV's cv::line draws these masks pixel for pixel (checked once with opencv-python:
    the same 0.7196 and 0.3437); the issue's 0.718 and 0.344 within 0.002."""
    iou5 = culane_ious([vertical(800)], [vertical(805)])[0, 0]
    iou15 = culane_ious([vertical(800)], [vertical(815)])[0, 0]
    assert round(iou5, 4) == 0.7196 and abs(iou5 - 0.718) < 0.002
    assert round(iou15, 4) == 0.3437 and abs(iou15 - 0.344) < 0.002
    mask = culane_lane_mask(vertical(800))
    assert mask[300:590, 785:816].all() and mask.sum(1)[400] == 31  # 30 px thick: columns 785..815
    tp, fp, fn = culane_counts([vertical(805)], [vertical(800)])
    at = CULANE_IOU_THRESHOLDS.index
    assert (tp[at(0.5)], fp[at(0.5)], fn[at(0.5)]) == (1, 0, 0) and (tp[at(0.75)], fp[at(0.75)]) == (0, 1)
    tp, fp, fn = culane_counts([vertical(815)], [vertical(800)])
    assert (tp[at(0.5)], fp[at(0.5)], fn[at(0.5)]) == (0, 1, 1)
    assert lane_f1(8, 2, 4) == pytest.approx(0.727, abs=5e-4)  # P 0.8, R 0.667


def test_culane_metrics_by_hand():
    """3 images: (a) 2 gt, 2 preds 5 px off (IoU 0.72) -> TP 2 at 0.5, 0 at 0.75; (b) 2 gt, 1 pred on one of
    them exactly -> TP 1, FN 1; (c) no gt, 1 pred -> FP 1 ('cross'). Totals at 0.5: TP 3, FP 1, FN 1;
    at 0.75: TP 1, FP 3, FN 3. Each prediction is matched once (Hungarian), a lone lane point scores 0."""
    a_gt, a_pred = [vertical(300), vertical(1200)], [vertical(1205), vertical(305)]
    b_gt, b_pred = [vertical(500), vertical(900)], [vertical(900)]
    c_pred = [vertical(700)]
    m = culane_metrics([a_pred, b_pred, c_pred], [a_gt, b_gt, []], ["normal", "night", "cross"])
    assert m["f1_50"] == pytest.approx(lane_f1(3, 1, 1)) and m["f1_75"] == pytest.approx(lane_f1(1, 3, 3))
    assert (m["precision"], m["recall"]) == (0.75, 0.75)
    # IoU 0.72 is a TP at 0.50..0.70 (5 thresholds), IoU 1.0 at all 10
    assert m["mf1"] == pytest.approx((5 * lane_f1(3, 1, 1) + 5 * lane_f1(1, 3, 3)) / 10)
    assert (m["f1_50_normal"], m["f1_50_night"], m["f1_50_cross"]) == (1.0, pytest.approx(2 / 3), 0.0)
    assert (m["fp_normal"], m["fp_night"], m["fp_cross"]) == (0, 0, 1)
    # one prediction between two gt lanes matches one of them only; a one-point lane is a lane that scores 0
    tp, fp, fn = culane_counts([vertical(802)], [vertical(800), vertical(804)])
    assert (tp[0], fp[0], fn[0]) == (1, 0, 1)
    tp, fp, fn = culane_counts([[(800.0, 590.0)]], [vertical(800)])
    assert (tp[0], fp[0], fn[0]) == (0, 1, 1)
    with pytest.raises(InputError, match="2 predictions for 3 images"):
        culane_metrics([[], []], [[], [], []])


def test_spline_is_scnns_and_passes_through_the_points():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(3, 12))
        ys = np.sort(rng.choice(np.arange(250, 600, 10), n, replace=False))[::-1]
        pts = list(zip(rng.uniform(-50, 1700) + rng.uniform(-2, 2) * (590 - ys) + rng.normal(0, 5, n), ys))
        ours = culane_spline(pts)
        assert ours.dtype == np.float32 and len(ours) == (n - 1) * 50 + 1
        assert np.array_equal(ours, np.array(ref_spline(pts), dtype=np.float32))
        assert np.allclose(ours[::50], np.array(pts, dtype=np.float32), atol=1e-3)  # an interpolating spline
    assert np.array_equal(culane_spline([(1.0, 2.0), (3.0, 4.0)]), np.float32([[1, 2], [3, 4]]))

# -----------------------------------------------------------------------------
# CULane: differential test against SCNN's counter / lane_compare / spline / hungarianGraph


def random_culane_image(rng, H, W):
    """2-6 gt lanes as CULane labels them (a point every row step, from the bottom up, some cut short, some
    leaving the image), predictions: shifted / tilted / shortened copies with gaps, missing lanes, extra
    lanes, an occasional 1- or 2-point lane."""
    step = 4

    def lane(x0, slope, curve, top, bottom):
        ys = np.arange(bottom, top - 1, -step)
        return [(round(float(x0 + slope * (H - y) + curve * (H - y) ** 2), 3), float(y)) for y in ys]
    gt = []
    for _ in range(rng.integers(2, 7)):
        gt.append(lane(rng.uniform(-5, W + 5), rng.uniform(-2.5, 2.5), rng.uniform(-0.02, 0.02),
                       rng.integers(10, 30), H - rng.choice([0, 0, 10])))
    pred = []
    for g in gt:
        if rng.random() < 0.8:
            pts = [(x + rng.normal(0, rng.choice([0.3, 1.0, 3.0])), y) for x, y in g]
            pts = pts[rng.integers(0, 3):len(pts) - rng.integers(0, 3)]
            if rng.random() < 0.3 and len(pts) > 6:  # a gap
                g0 = rng.integers(1, len(pts) - 4)
                pts = pts[:g0] + pts[g0 + 3:]
            pred.append(pts)
    for _ in range(rng.choice([0, 0, 1, 2])):
        pred.append(lane(rng.uniform(0, W), rng.uniform(-2, 2), 0.0, rng.integers(10, 30), H))
    if rng.random() < 0.1:
        pred.append([(rng.uniform(0, W), float(H))] + ([(rng.uniform(0, W), 20.0)] if rng.random() < 0.5 else []))
    rng.shuffle(pred)
    return pred, gt


def test_culane_matches_scnn_on_random_images():
    """2,000 random images on a 1/10-scale canvas (164 x 59, 3 px lanes): TP / FP / FN at every IoU
    threshold equal to SCNN's counting (plain spline, pixel-by-pixel raster, its KM matching) on every image."""
    rng = np.random.default_rng(0)
    H, W, width = 59, 164, 3
    n_tp = 0
    for _ in range(2000):
        pred, gt = random_culane_image(rng, H, W)
        tp, fp, fn = culane_counts(pred, gt, width, (H, W))
        ref = ref_count_im_pair(gt, pred, width, (H, W), CULANE_IOU_THRESHOLDS)
        assert list(zip(tp, fp, fn)) == ref, (pred, gt)
        n_tp += tp[0]
    assert n_tp > 3000  # the cases are mostly matches, not trivially empty


def test_lane_masks_equal_the_pixel_by_pixel_raster():
    """The row-interval painter against the whole-canvas definition, at CULane's own size and lane width."""
    rng = np.random.default_rng(2)
    for i in range(40):
        if i % 4 == 0:  # long straight segments in every direction, off the image too
            pts = [tuple(map(float, p)) for p in zip(rng.integers(-100, 1740, 2), rng.integers(-60, 650, 2))]
        else:  # a labelled lane, scaled up to CULane's frame
            pts = [(x * 10, y * 10) for x, y in random_culane_image(rng, 59, 164)[1][0]]
        assert np.array_equal(culane_lane_mask(pts), ref_mask(pts, 30, (590, 1640))), pts


def test_assignment_is_the_exact_optimum():
    """lane_assignment's total equals the best over all permutations (brute force) on random score matrices,
    ties and zeros included. SCNN's KM can stop short of the optimum on near-ties (here 2% of uniform random
    matrices, changing TP in 0.2%); on lane IoUs its counts agree (test_culane_matches_scnn_on_random_images)."""
    rng = np.random.default_rng(3)
    for _ in range(2000):
        m, n = rng.integers(1, 7, 2)
        s = rng.choice([0.0, 0.3, 0.51, 0.8], (m, n)) if rng.random() < 0.3 else rng.random((m, n))
        s = np.where(rng.random((m, n)) < 0.4, 0.0, s)
        pairs = lane_assignment(s)
        assert len(pairs) == min(m, n) and len({i for i, _ in pairs}) == len({j for _, j in pairs}) == min(m, n)
        if m <= n:
            best = max(sum(s[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(n), int(m)))
        else:
            best = max(sum(s[i, j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(m), int(n)))
        assert sum(s[i, j] for i, j in pairs) == pytest.approx(best, abs=1e-12)
        km = ref_km_match(s.tolist())  # SCNN's KM: tight within 0.01, so at most the optimum, now and then below
        assert sum(s[i, j] for i, j in enumerate(km) if j >= 0) <= best + 1e-12

# -----------------------------------------------------------------------------
# CULane reader: a CULane-format split written here, read back exactly


def write_culane(root, n_train=4, n_test=3, seed=0, size=(1640, 590)):
    """CULane's layout: driver_*/<video>.MP4/<frame>.jpg with <frame>.lines.txt beside it, list/train_gt.txt
    (path, mask path, 4 lane flags), list/test.txt, list/test_split/test0_normal.txt, test8_night.txt.
    Lanes: 2-4 per image, a point every 10 px from 590 up, x as CULane writes it (leaving the image on
    either side sometimes). -> {image path: lanes}."""
    rng = np.random.default_rng(seed)
    labels, names = {}, []
    for i in range(n_train + n_test):
        name = f"driver_{23 if i < n_train else 37}_30frame/0515{i:04d}.MP4/{i * 30:05d}.jpg"
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        lanes = []
        for k in range(int(rng.integers(2, 5))):
            x0, slope, top = rng.uniform(-100, 1740), rng.uniform(-3, 3), int(rng.integers(25, 35)) * 10
            lanes.append([(round(float(x0 + slope * (590 - y)), 4), float(y)) for y in range(590, top - 1, -10)])
        (root / name.replace(".jpg", ".lines.txt")).write_text(
            "".join(" ".join(f"{x!r} {int(y)}" for x, y in lane) + " \n" for lane in lanes))
        labels[name] = lanes
        names.append(name)
    os.makedirs(root / "list" / "test_split", exist_ok=True)
    (root / "list" / "train_gt.txt").write_text("".join(
        f"/{n} /laneseg_label_w16/{n[:-4]}.png 1 1 1 1\n" for n in names[:n_train]))
    (root / "list" / "test.txt").write_text("".join(f"/{n}\n" for n in names[n_train:]))
    (root / "list" / "test_split" / "test0_normal.txt").write_text(names[n_train] + "\n")
    (root / "list" / "test_split" / "test8_night.txt").write_text("".join(n + "\n" for n in names[n_train + 1:]))
    return labels


def test_culane_reader_reads_written_files_back_exactly(tmp_path):
    labels = write_culane(tmp_path)
    train, test = (culane_read_list(str(tmp_path), f"list/{f}") for f in ("train_gt.txt", "test.txt"))
    assert [e["raw_file"] for e in train + test] == list(labels)
    for e in train + test:
        assert e["points"] == labels[e["raw_file"]]  # every float as written
    cats = culane_read_categories(str(tmp_path))
    assert [cats[e["raw_file"]] for e in test] == ["normal", "night", "night"]
    assert culane_read_categories(str(tmp_path / "list")) == {}
    rows = culane_row_grid(10)
    assert rows[0] == 40 and rows[-1] == 590 and len(rows) == 56 and culane_row_grid(20)[-2:] == [570, 590]
    s = culane_sample(train[0], str(tmp_path), rows, 160, 96)
    assert s["image"].shape == (3, 96, 160) and s["h_samples"] == rows and s["points"] == train[0]["points"]
    for lane, xs in zip(train[0]["points"], s["lanes"]):  # on the grid: the points inside the image, exactly
        assert culane_from_grid(xs, rows) == [(x, y) for x, y in lane if 0 <= x < 1640]
    assert culane_to_grid([(100.0, 590.0), (120.0, 570.0)], [560, 570, 580, 590]) == [-2.0, 120.0, 110.0, 100.0]


def test_culane_reader_refuses_malformed_input_in_one_line(tmp_path):
    labels = write_culane(tmp_path, n_train=1, n_test=1, size=(82, 30))
    name = next(iter(labels))
    lines = tmp_path / name.replace(".jpg", ".lines.txt")
    cases = {"10 590 11 580 12\n": r"\.lines\.txt:1: 5 values, an odd number",
             "10 590 nan 580\n": r"\.lines\.txt:1: a lane point is nan",
             "10 590 11 580\n10 590 inf 580\n": r"\.lines\.txt:2: a lane point is inf",
             "10 590 eleven 580\n": r"\.lines\.txt:1: not a number"}
    for text, msg in cases.items():
        lines.write_text(text)
        with pytest.raises(InputError, match=msg) as err:
            culane_read_list(str(tmp_path), "list/train_gt.txt")
        assert "\n" not in str(err.value)
    lines.write_text("10 590 11 580\n")
    for listed, msg in ((f"//{name}", "outside the data root"), (f"/../{tmp_path.name}/{name}", "outside the data root"),
                        ("/driver_0/none.jpg", "image driver_0/none.jpg not found")):
        (tmp_path / "list" / "bad.txt").write_text(f"/{name}\n{listed}\n")
        with pytest.raises((InputError, FileNotFoundError), match=r"bad.txt:2: .*" + msg):
            culane_read_list(str(tmp_path), "list/bad.txt")
    lines.unlink()
    with pytest.raises(FileNotFoundError, match=r"train_gt.txt:1: lane file .*lines.txt not found"):
        culane_read_list(str(tmp_path), "list/train_gt.txt")
