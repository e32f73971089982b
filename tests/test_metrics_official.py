"""Differential tests: each metric of the OCR, Pointer and Seg recipes against a plain re-implementation of its
official scorer's code, on thousands of random cases, with zero mismatches. The deliberate differences (each
stated in the metric's docstring) are checked as such:
- OmniDocBench: none within clean_string + Edit_dist; a page is one sample (no block matching, no
  textblock2unicode), so these tests feed page strings to both sides.
- Fox: where nltk returns None (an empty word set; the official mean then fails) ours scores 1 if both sides are
  empty, else 0; the character NED of two empty strings is 0 here (a ZeroDivisionError there).
- Pointer: no public scorer; the figures are checked against their plain definitions, matching included
  (maximum one-to-one matching, up to 7 points a side: beyond that pointer_match is greedy).
- Seg (LISA's validate): exact ratios, without LISA's 1e-5 / 1e-10 in the denominators (so they agree within
  1e-5), and cIoU of a set whose unions are all empty is 1 here (0 there)."""
import math
import random
import re
import statistics

import numpy as np
import pytest
import torch

from data_ocr import fox_word_metrics, ocr_metrics, ocr_ned, ocr_omnidoc_normalize
from data_pointer import pointer_pixel_metrics, pointer_sequence_metrics
from data_seg import seg_ciou, seg_giou, seg_iou_stats

N_CASES = 2000

# -----------------------------------------------------------------------------
# plain re-implementations of the official code


def levenshtein(a, b):
    """Textbook DP (Levenshtein.distance in OmniDocBench, nltk.edit_distance in Fox)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def omnidoc_clean_string(s):
    """OmniDocBench utils/data_preprocess.py clean_string: six str.replace calls, then the character filter."""
    s = s.replace("\\t", "").replace("\\n", "").replace("\t", "").replace("\n", "").replace("/t", "").replace("/n", "")
    return re.sub(r"[^\w\u4e00-\u9fff]", "", s)


def omnidoc_page_score(pred, gt):
    """OmniDocBench metrics/cal_metric.py call_Edit_dist on one sample: norm_* when truthy, else the raw string;
    no metric (None) when both are empty."""
    norm_gt, norm_pred = omnidoc_clean_string(gt), omnidoc_clean_string(pred)
    gt = norm_gt if norm_gt else gt
    pred = norm_pred if norm_pred else pred
    if len(pred) > 0 or len(gt) > 0:
        return levenshtein(pred, gt) / max(len(pred), len(gt))
    return None


def omnidoc_mean(preds, gts):
    """edit_sample_avg: the mean of Edit_num / upper_len over samples, pandas skipping the unscored (NaN) ones."""
    scores = [s for s in map(omnidoc_page_score, preds, gts) if s is not None]
    return sum(scores) / len(scores) if scores else None


def nltk_precision(reference, test):
    return None if not test else len(reference & test) / len(test)


def nltk_recall(reference, test):
    return None if not reference else len(reference & test) / len(reference)


def nltk_f_measure(reference, test, alpha=0.5):
    p, r = nltk_precision(reference, test), nltk_recall(reference, test)
    if p is None or r is None:
        return None
    if p == 0 or r == 0:
        return 0
    return 1.0 / (alpha / p + (1 - alpha) / r)


def fox_cal_per_metrics(pred, gt):
    """ucaslcl/Fox eval_tools/eval_ocr_test.py cal_per_metrics(pred, gt), set metrics and edit_dist."""
    import jieba
    chinese = re.compile(r"[\u4e00-\u9fa5]")
    if chinese.search(gt) or chinese.search(pred):
        reference, hypothesis = jieba.lcut(gt), jieba.lcut(pred)
    else:
        reference, hypothesis = gt.split(), pred.split()
    reference, hypothesis = set(reference), set(hypothesis)
    n = max(len(pred), len(gt))
    return dict(f_measure=nltk_f_measure(reference, hypothesis), precision=nltk_precision(reference, hypothesis),
                recall=nltk_recall(reference, hypothesis), edit_dist=levenshtein(pred, gt) / n if n else None)


def fox_official(output, truth):
    """doc_text_eval calls cal_per_metrics(ann["label"], ann["answer"]): the ground truth in the `pred` slot."""
    return fox_cal_per_metrics(truth, output)


def lisa_giou_ciou(preds, gts):
    """dvlab-research/LISA train_ds.py validate with utils/utils.py intersectionAndUnionGPU (2 classes, the
    foreground's figures), one mask at a time."""
    inter_sum = union_sum = 0.0
    acc = []
    for p, g in zip(preds, gts):
        p, g = np.asarray(p, np.int64).reshape(-1), np.asarray(g, np.int64).reshape(-1)
        area_inter = np.bincount(p[p == g], minlength=2)[1]
        union = np.bincount(p, minlength=2)[1] + np.bincount(g, minlength=2)[1] - area_inter
        inter_sum, union_sum = inter_sum + area_inter, union_sum + union
        acc.append(area_inter / (union + 1e-5) + (1.0 if union == 0 else 0.0))
    return sum(acc) / len(acc), inter_sum / (union_sum + 1e-10)


def max_matching(pred_px, gt_px, radius):
    """Maximum one-to-one matching within radius (Kuhn's augmenting paths)."""
    ok = [[math.dist(p, g) <= radius for g in gt_px] for p in pred_px]
    owner = [None] * len(gt_px)

    def augment(i, seen):
        for j in range(len(gt_px)):
            if ok[i][j] and j not in seen:
                seen.add(j)
                if owner[j] is None or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False
    return sum(augment(i, set()) for i in range(len(pred_px)))


def percentile_linear(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

# -----------------------------------------------------------------------------
# random cases

PIECES = ["a", "Z", "7", "_", " ", "  ", ".", ",", "!", "-", "$", "\\", "/", "t", "n", "\\t", "\\n", "/t", "/n",
          "\t", "\n", "\u00e9", "\u00df", "\u0301", "\u03a9", "\u0416", "\u6f22", "\u5b57", "\u4e00", "\u9fa5",
          "\u9fb0", "\u3002", "\uff0c", "\u3042", "\ud55c", "\U0001f600", "\u00a0", "the", "cat", "\u732b", "\u6211\u7231"]


def random_text(rng):
    if rng.random() < 0.1:
        return ""
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))


def text_pairs(seed, n):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a = random_text(rng)
        b = a if rng.random() < 0.1 else random_text(rng)  # some exact matches
        pairs.append((a, b))
    return pairs

# -----------------------------------------------------------------------------
# the differential tests


def test_omnidocbench_clean_string_and_ned_equal_the_official():
    mismatches = []
    for pred, gt in text_pairs(0, N_CASES):
        for s in (pred, gt):
            if ocr_omnidoc_normalize(s) != omnidoc_clean_string(s):
                mismatches.append(("clean", s))
        ours, official = ocr_ned(pred, gt, normalize="omnidocbench"), omnidoc_page_score(pred, gt)
        if (official is None) != math.isnan(ours) or (official is not None and ours != pytest.approx(official, abs=1e-12)):
            mismatches.append(("ned", pred, gt, ours, official))
    assert not mismatches, mismatches[:5]


def test_omnidocbench_page_mean_equals_the_official():
    pairs = text_pairs(1, N_CASES)
    mismatches, empties = [], 0
    for start in range(0, len(pairs), 8):
        batch = pairs[start:start + 8]
        if start % 80 == 0:  # some batches every page of which is empty on both sides
            batch = [("", "")] * 3 + ([] if start % 160 else batch[:1])
        preds, gts = [p for p, _ in batch], [g for _, g in batch]
        ours, official = ocr_metrics(preds, gts)["ned_omnidoc"], omnidoc_mean(preds, gts)
        empties += official is None
        if (official is None) != math.isnan(ours) or (official is not None and ours != pytest.approx(official, abs=1e-12)):
            mismatches.append((batch, ours, official))
    assert not mismatches, mismatches[:3]
    assert empties > 0  # the all-empty case was exercised


def test_fox_equals_the_official_scorer():
    pytest.importorskip("jieba")
    mismatches, defined, cjk = [], 0, 0
    for pred, gt in text_pairs(2, N_CASES):
        ours, official = fox_word_metrics(pred, gt), fox_official(pred, gt)
        cjk += re.search(r"[\u4e00-\u9fa5]", pred + gt) is not None
        if official["precision"] is not None and official["recall"] is not None:
            defined += 1
            got = (ours["fox_precision"], ours["word_precision"], ours["word_f1"])
            want = (official["precision"], official["recall"], official["f_measure"])
        else:  # the deliberate difference: an empty word set scores 1 against an empty one, else 0
            g_empty, p_empty = official["precision"] is None, official["recall"] is None
            both = float(g_empty and p_empty)
            got = (ours["fox_precision"], ours["word_precision"])
            want = (both if g_empty else 0.0, both if p_empty else 0.0)
        if got != pytest.approx(want, abs=1e-12):
            mismatches.append((pred, gt, got, want))
        if official["edit_dist"] is not None and ocr_ned(pred, gt) != pytest.approx(official["edit_dist"], abs=1e-12):
            mismatches.append(("edit_dist", pred, gt))
    assert not mismatches, mismatches[:5]
    assert defined > N_CASES // 2 and cjk > N_CASES // 4  # both splits and the defined branch well covered


def test_seg_giou_ciou_equal_lisa():
    rng = np.random.default_rng(0)
    mismatches, all_empty = [], 0
    for case in range(N_CASES):
        n, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
        gt = rng.random((n, h, w)) < rng.random()
        pred = rng.random((n, h, w)) < rng.random()
        for i in range(n):  # empty prediction, empty target, both
            kind = rng.integers(0, 5)
            if kind == 0:
                pred[i] = False
            elif kind == 1:
                gt[i] = False
            elif kind == 2:
                pred[i] = gt[i] = False
        single = n == 1 and case % 2 == 0  # one (H, W) mask, scored whole
        p, g = (pred[0], gt[0]) if single else (pred, gt)
        inter, union = seg_iou_stats(torch.from_numpy(p), torch.from_numpy(g))
        giou, ciou = lisa_giou_ciou(pred, gt)
        if union.sum() == 0:  # the deliberate difference: cIoU of nothing is 1 here, 0 in LISA
            all_empty += 1
            ok = seg_ciou(inter, union) == 1.0 and ciou == 0.0
        else:
            ok = abs(seg_ciou(inter, union) - ciou) <= 1e-5
        if not ok or len(inter) != n or abs(seg_giou(inter, union) - giou) > 1e-5:
            mismatches.append((case, seg_giou(inter, union), giou, seg_ciou(inter, union), ciou))
    assert not mismatches, mismatches[:5]
    assert all_empty > 0


def test_pointer_pixel_figures_equal_their_definition():
    rng = np.random.default_rng(0)
    mismatches = []
    for case in range(N_CASES):
        n = int(rng.integers(1, 6))
        wh = np.stack([rng.integers(32, 2000, n), rng.integers(32, 2000, n)], 1)
        gt = rng.uniform(-1, 1, (n, 2))
        pred = np.clip(gt + rng.normal(0, 10 ** rng.uniform(-3, -0.5), (n, 2)), -1, 1)
        if case % 4 == 0:  # whole-pixel misses along x on power-of-two sizes: errors of exactly 2, 5, 10, 15 px
            wh = 2 ** rng.integers(5, 11, (n, 2))
            gt = rng.integers(0, 16, (n, 2)) * 2 / wh - 1
            pred = gt + np.stack([rng.choice([2, 5, 10, 15, 3], n) * 2 / wh[:, 0], np.zeros(n)], 1)
        frame = np.stack([np.round(384 * wh[:, 0] / wh[:, 1]), np.full(n, 384)], 1)
        m = pointer_pixel_metrics(pred, gt, wh, frame)
        for suffix, size in (("", wh), ("384", frame)):
            err = [math.hypot((p[0] - g[0]) * s[0] / 2, (p[1] - g[1]) * s[1] / 2) for p, g, s in zip(pred, gt, size)]
            want = {"mean_px": sum(err) / n, "median_px": statistics.median(err), "p95_px": percentile_linear(err, 95),
                    "mae_x_px": sum(abs(p[0] - g[0]) * s[0] / 2 for p, g, s in zip(pred, gt, size)) / n}
            want.update({f"within_{t}px": sum(e <= t for e in err) / n for t in (2, 5, 10, 15)})
            for k, v in want.items():
                if m[k + suffix] != pytest.approx(v, rel=1e-9, abs=1e-9):
                    mismatches.append((case, k + suffix, m[k + suffix], v))
    assert not mismatches, mismatches[:5]


def test_pointer_sequence_metrics_equal_their_definition():
    rng = np.random.default_rng(1)
    mismatches = []
    for case in range(N_CASES):
        q = int(rng.integers(1, 4))
        preds, gts, whs, frames = [], [], [], []
        for _ in range(q):
            w, h = int(rng.integers(32, 1500)), int(rng.integers(32, 1500))
            g = rng.uniform(-1, 1, (int(rng.integers(0, 7)), 2))
            k = int(rng.integers(0, len(g) + 1))
            near = g[:k] + rng.normal(0, 6 / h, (k, 2))  # misses of ~3 px: some within 5 px, some not
            extra = rng.uniform(-1, 1, (int(rng.integers(0, 3)), 2))  # extra predictions; missing ones: k < len(g)
            p = np.concatenate([near, extra])[:7]
            preds.append(p[rng.permutation(len(p))])
            gts.append(g)
            whs.append((w, h))
            frames.append((round(384 * w / h), 384))
        m = pointer_sequence_metrics(preds, gts, whs, frames, radius=5)
        n_pred, n_gt = sum(len(p) for p in preds), sum(len(g) for g in gts)
        for suffix, sizes in (("", whs), ("384", frames)):
            px = lambda pts, s: [((x + 1) / 2 * s[0], (y + 1) / 2 * s[1]) for x, y in pts]
            matched = sum(max_matching(px(p, s), px(g, s), 5) for p, g, s in zip(preds, gts, sizes))
            want = {"seq_precision_5px": matched / max(n_pred, 1), "seq_recall_5px": matched / max(n_gt, 1)}
            for k, v in want.items():
                if m[k + suffix] != pytest.approx(v, abs=1e-12):
                    mismatches.append((case, k + suffix, m[k + suffix], v))
        counts = [(len(p), len(g)) for p, g in zip(preds, gts)]
        if m["count_acc"] != sum(a == b for a, b in counts) / q or \
                m["count_mae"] != pytest.approx(sum(abs(a - b) for a, b in counts) / q):
            mismatches.append((case, "count"))
    assert not mismatches, mismatches[:5]
