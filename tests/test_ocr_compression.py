"""The optical-compression study runner (ocr_compression.py): page layouts, the crossing arithmetic, and a 2-point
grid end to end (training and evals in this process) whose table, PNG and ratios are checked."""
import json
import os

import pytest

import ocr_compression as oc
from data_ocr import ocr_page_layout, ocr_parse_layout, ocr_synthetic_sample
from inprocess import run_script
from model import InputError


def test_page_layouts_fill_the_page():
    assert ocr_parse_layout("6x16") == (6, 16)
    assert ocr_page_layout(64, 3, 9) == dict(pitch=6, line_gap=20, font_size=9)  # near the recipe's 7 px / 16 px
    assert ocr_page_layout((128, 64), 3, 18) == dict(pitch=6, line_gap=20, font_size=9)  # the same density, wider
    with pytest.raises(InputError, match="LINESxCHARS"):
        ocr_parse_layout("6-16")
    with pytest.raises(InputError, match="does not fit a 64 x 64 page"):
        ocr_page_layout(64, 3, 40)
    # min_lines = max_lines and line_chars: every page has exactly that many lines, none longer than line_chars
    lay = ocr_page_layout(96, 5, 16)
    for i in range(20):
        s = ocr_synthetic_sample(0, "val", i, 96, (lay["font_size"],), 5, styles=("paragraph",), pitch=lay["pitch"],
                                 line_gap=lay["line_gap"], min_lines=5, line_chars=16)
        lines = s["text"].split("\n")
        assert len(lines) == 5 and max(map(len, lines)) <= 16


def rows(*points):
    return [dict(ratio=r, fox_precision=p) for r, p in points]


def test_crossings_are_interpolated_between_points():
    assert oc.crossing(rows((2, 1.0), (4, 0.9), (8, 0.5)), 0.95) == "3.00x"  # 1.0 -> 0.9 between 2x and 4x
    assert oc.crossing(rows((8, 0.5), (2, 1.0), (4, 0.9)), 0.60) == "7.00x"  # sorted first; 0.9 -> 0.5 over 4x..8x
    assert oc.crossing(rows((2, 0.99), (4, 0.97)), 0.95) == "not crossed in range (up to 4.00x)"
    assert oc.crossing(rows((2, 0.4), (4, 0.1)), 0.60) == "below from the first point (2.00x)"


def launch(args, calls=None):
    """train_ocr.py in this process (a fresh interpreter per run costs ~5 s), its arguments noted in `calls`."""
    if calls is not None:
        calls.append(args)
    r = run_script("train_ocr.py", args, env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr


def tiny_grid(monkeypatch, tmp_path, calls=None, **settings):
    """oc.main() on a tiny model, 2 steps, 4 eval pages, these settings."""
    small = "--sam_dim=16 --sam_window=4 --neck_dim=8 --n_layer=1 --n_embd=32 --n_head=2 --n_kv_head=2 --batch_size=4"
    monkeypatch.setattr(oc, "launch", lambda args: launch(args, calls))
    for k, v in dict(out=str(tmp_path), steps=2, n_eval=4, extra=small, **settings).items():
        monkeypatch.setattr(oc, k, v)
    oc.main()


def test_a_two_point_grid_writes_the_table_and_the_plot(tmp_path, monkeypatch):
    tiny_grid(monkeypatch, tmp_path, budget_knob="image_size", budgets=(32,), lengths=("1x4", "2x6"))
    table = open(tmp_path / "compression.md").read()
    assert os.path.getsize(tmp_path / "compression.png") > 1000
    got = json.load(open(tmp_path / "compression.json"))
    assert [r["length"] for r in got] == ["1x4", "2x6"] and all(r["steps"] == 2 for r in got)
    for r in got:  # the ratio is the eval's measured text tokens over the q*q vision tokens (32 px: 2 x 2)
        res = json.load(open(tmp_path / f"s32_{r['length']}" / "results.json"))
        texts = [s["gt"] for s in res["samples"]]
        assert res["n_eval"] == 4 and r["text_tokens"] == sum(len(t.encode()) for t in texts) / 4  # byte tokens
        assert r["budget"] == 4 and r["ratio"] == pytest.approx(r["text_tokens"] / 4)
        assert f"| 4 | 32 | 16 | {r['length']} | {r['text_tokens']:.1f} | {r['ratio']:.2f}x |" in table
        # the recipe's 64 px font at half size (pitch and line gap rounded down), exactly LINES lines of <= CHARS
        c, (n, m) = res["config"], oc.ocr_parse_layout(r["length"])
        assert (c["pitch"], c["line_gap"], c["font_sizes"]) == (3, 8, [5, 6])
        assert all(len(t.split("\n")) == n and max(map(len, t.split("\n"))) <= m for t in texts)
    assert "| 4 | " in table.split("precision < 60% at")[1]  # the crossings line of the budget

    # a second call with the same settings reads every run back (an interrupted or split grid resumes) ...
    launched = []
    monkeypatch.setattr(oc, "launch", launched.append)
    oc.main()
    assert launched == [] and json.load(open(tmp_path / "compression.json")) == got
    # ... and a changed setting runs again: new steps retrain the budget, and its evals follow
    monkeypatch.setattr(oc, "launch", lambda args: launch(args, launched))
    monkeypatch.setattr(oc, "steps", 3)
    oc.main()
    assert len(launched) == 3 and all(r["steps"] == 3 for r in json.load(open(tmp_path / "compression.json")))


def test_a_sam_patch_budget_keeps_the_font_and_coarsens_the_tokens(tmp_path, monkeypatch):
    """budget_knob='sam_patch': the budget is the area one token covers on image_size pages (64 px, sam_patch 16:
    one token), the text at train_ocr's fixed 7 px font; an eval page has exactly LINES lines of <= CHARS."""
    calls = []
    tiny_grid(monkeypatch, tmp_path, calls, budget_knob="sam_patch", budgets=(16,), lengths=("1x4", "2x8"))
    assert "--max_lines=2" in calls[0] and "--line_chars=0" in calls[0]  # training: 1..2 filled lines
    got = json.load(open(tmp_path / "compression.json"))
    assert [(r["budget"], r["image_size"], r["token_px"]) for r in got] == [(1, 64, 64)] * 2
    for r, (n, m) in zip(got, [(1, 4), (2, 8)]):
        res = json.load(open(tmp_path / f"p16_{r['length']}" / "results.json"))
        assert res["config"]["pitch"] == 7 and res["config"]["line_gap"] == 16  # the font did not move
        for sample in res["samples"]:
            lines = sample["gt"].split("\n")
            assert len(lines) == n and max(map(len, lines)) <= m
        assert r["ratio"] == pytest.approx(r["text_tokens"])  # one vision token
    monkeypatch.setattr(oc, "lengths", ("5x8",))  # 5 lines of 16 px do not fit 64 px
    with pytest.raises(InputError, match="5x8 does not fit a 64 px page at its font"):
        oc.main()
    monkeypatch.setattr(oc, "budget_knob", "sam")
    with pytest.raises(InputError, match="budget_knob is 'image_size' or 'sam_patch'"):
        oc.main()
