"""OCR crop mode (DeepSeek-OCR's Gundam tiling): token counts per mode, the crop rule, views and labels, the
encoder's output count and layout, the scatter check, and a tiled run end to end."""
import json
import os

import numpy as np
import pytest
import torch

from data import Tokenizer
from data_ocr import (DeepEncoder, EncoderConfig, TiledPages, ocr_crop_grid, ocr_synthetic_sample, ocr_tile_sample,
                      ocr_tile_views, vision_token_count)
from inprocess import run_script
from model import GPT, GPTConfig, InputError


@pytest.mark.parametrize("mode, size, crop, grid, count", [
    ("Tiny", 512, 0, (1, 1), 73), ("Small", 640, 0, (1, 1), 111), ("Base", 1024, 0, (1, 1), 273),
    ("Large", 1280, 0, (1, 1), 421),
    ("Gundam 2x2", 1024, 640, (2, 2), 273 + 420),  # 1024 px global view + (2*10+1) * 2*10 local tokens
    ("Gundam 3w x 2h", 1024, 640, (3, 2), 893),   # 273 + (3*10+1) * 2*10
    ("Gundam, page fits one crop", 1024, 640, (1, 1), 273)])
def test_vision_token_count_every_mode(mode, size, crop, grid, count):
    assert vision_token_count(size, 16, crop_size=crop, grid=grid) == count, mode


def deepseek_crop_rule(width, height, crop, min_num=2, max_num=9):
    """DeepSeek-OCR's choice written out plainly (infer: no crops at <= crop in both sides; dynamic_preprocess and
    find_closest_aspect_ratio otherwise)."""
    if width <= crop and height <= crop:
        return 1, 1
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    ratios = sorted(ratios, key=lambda r: r[0] * r[1])
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and width * height > 0.5 * crop * crop * r[0] * r[1]:
            best = r
    return best


def test_crop_grid_is_deepseeks_rule():
    rng = np.random.default_rng(0)
    pages = [(640, 640), (641, 640), (1280, 1024), (1024, 1280), (2000, 500), (800, 2400), (1700, 2200),
             (3000, 3000), (1280, 1280), (128, 64), (128, 128), (130, 40), (64, 64)]
    pages += [tuple(int(v) for v in rng.integers(100, 4000, 2)) for _ in range(300)]
    for w, h in pages:
        assert ocr_crop_grid(w, h, 640) == deepseek_crop_rule(w, h, 640), (w, h)
        assert ocr_crop_grid(w, h, 64) == deepseek_crop_rule(w, h, 64), (w, h)
    # worked examples: a square page 2x2 (a 3x3 tie needs over half of 3x3 crops' pixels), a wide one 2x1
    assert ocr_crop_grid(128, 128, 64) == (2, 2) and ocr_crop_grid(200, 200, 64) == (3, 3)
    assert ocr_crop_grid(128, 64, 64) == (2, 1) and ocr_crop_grid(64, 64, 64) == (1, 1)
    assert ocr_crop_grid(1280, 1024, 640, max_crops=6) == deepseek_crop_rule(1280, 1024, 640, max_num=6)


def test_tile_views_cut_the_page_in_raster_order():
    page = torch.rand(3, 64, 128)  # (3, H, W): a 2w x 1h page of 64 px crops
    view, crops, grid = ocr_tile_views(page, 32, 64)
    assert grid == (2, 1) and view.shape == (3, 32, 32) and crops.shape == (2, 3, 64, 64)
    assert torch.equal(crops[0], page[:, :, :64]) and torch.equal(crops[1], page[:, :, 64:])  # cut as is
    assert view[:, :8].std() < 1e-6 and abs(view[:, :8].mean().item() - 127 / 255) < 1e-6  # padded above, mid grey
    square = torch.rand(3, 128, 128)
    _, crops, grid = ocr_tile_views(square, 64, 64)
    assert grid == (2, 2) and torch.equal(crops[1], square[:, :64, 64:]) and torch.equal(crops[2], square[:, 64:, :64])
    _, crops, grid = ocr_tile_views(torch.rand(3, 70, 150), 64, 64)  # resized to 2 x 1 crops first
    assert grid == (2, 1) and crops.shape == (2, 3, 64, 64)
    small = torch.rand(3, 64, 64)
    view, crops, grid = ocr_tile_views(small, 64, 64)  # fits one crop: the page is the global view, no crops
    assert grid == (1, 1) and crops.shape[0] == 0 and torch.equal(view, small)


def test_tile_labels_are_cut_like_the_pixels():
    s = ocr_synthetic_sample(0, "train", 3, 64, (10,), 3, pitch=7, line_gap=16, glyph_patch=4, page=(128, 64))
    assert s["image"].shape == (3, 64, 128) and s["glyphs"].shape == (16, 32) and s["slots"].shape == (4, 8, 3)
    t = ocr_tile_sample(s, 64, 64)
    assert t["grid"] == (2, 1) and t["glyphs"].shape == (3, 16, 16) and t["slots"].shape == (3, 4, 4, 3)
    assert (t["glyphs"][0] == -1).all() and (t["slots"][0] == -1).all()  # the scaled global view: unlabelled
    assert np.array_equal(t["glyphs"][1], s["glyphs"][:, :16]) and np.array_equal(t["glyphs"][2], s["glyphs"][:, 16:])
    assert np.array_equal(t["slots"][2], s["slots"][:, 4:])
    assert (t["glyphs"][1:] > 0).any()  # there is text under the crops
    # a page of the view's size is its own global view: its labels kept as they are
    one = ocr_synthetic_sample(0, "train", 3, 64, (10,), 3, pitch=7, line_gap=16, glyph_patch=4)
    kept = ocr_tile_sample(one, 64, 64)
    assert kept["grid"] == (1, 1) and np.array_equal(kept["glyphs"][0], one["glyphs"])


def tiny_encoder(image_size=32, center=False, clip_vit=None):
    torch.manual_seed(0)
    enc = DeepEncoder(EncoderConfig(image_size=image_size, sam_patch=4, sam_dim=16, sam_layers=2, sam_heads=2,
                                    sam_window=4, sam_global=(1,), neck_dim=8, clip_layers=1, clip_heads=2, out_dim=32,
                                    center=center, clip_vit=clip_vit))
    return enc.eval()


def test_encoder_output_count_and_layout_equal_the_formula():
    enc = tiny_encoder()  # 32 px views: q = 2
    views, grids = torch.randn(3, 3, 32, 32), [(2, 1), (1, 1), (2, 2)]
    crops = torch.randn(2 + 0 + 4, 3, 32, 32)
    out = enc(TiledPages(views, crops, grids))
    counts = [vision_token_count(32, 4, crop_size=32, grid=g) for g in grids]
    assert counts == [7 + 5 * 2, 7, 7 + 5 * 4] and out.shape == (sum(counts), 32)
    with torch.no_grad():
        glob, loc = enc(views), enc.features(crops)["proj"]  # (B, 7, D) untiled; (6, 4, D) the crops' q x q tokens
    pages = torch.split(out, counts)
    nl, sep = enc.image_newline, enc.view_separator
    # page 0 (2 crops side by side): local rows [crop0 row r, crop1 row r, newline], then the global view, separator
    p0 = pages[0]
    assert torch.allclose(p0[:5], torch.cat([loc[0, :2], loc[1, :2], nl[None]]), atol=1e-6)
    assert torch.allclose(p0[5:10], torch.cat([loc[0, 2:], loc[1, 2:], nl[None]]), atol=1e-6)
    assert torch.allclose(p0[10:], glob[0], atol=1e-6) and torch.equal(p0[-1], sep)
    assert torch.allclose(pages[1], glob[1], atol=1e-6)  # no crops: the untiled layout
    # page 2 (2 x 2 crops, raster order 2..5): its third local row is the bottom crops' first rows
    assert torch.allclose(pages[2][10:15], torch.cat([loc[4, :2], loc[5, :2], nl[None]]), atol=1e-6)
    assert torch.allclose(pages[2][20:], glob[2], atol=1e-6)


def test_crops_of_another_size_resize_the_positions():
    # Gundam's shape at a tiny size: 32 px global views, 16 px crops; SAM's positions resized, CLIP's interpolated
    enc = tiny_encoder(clip_vit=dict(pos_interpolate="bicubic_antialias"))
    out = enc(TiledPages(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16), [(3, 1), (1, 1)]))
    assert out.shape[0] == vision_token_count(32, 4, crop_size=16, grid=(3, 1)) + 7 == 7 + 4 + 7
    with pytest.raises(InputError, match="crops are 16 px, global views 32 px"):
        enc(TiledPages(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16), [(3, 1), (1, 1)]), glyphs=True)


def test_the_scatter_count_must_equal_the_encoders_output():
    tok = Tokenizer()
    image = tok["<|image|>"]
    enc = tiny_encoder()
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=64,
                        image_token_id=image))
    vision = enc(TiledPages(torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32), [(2, 1)]))
    n = vision_token_count(32, 4, crop_size=32, grid=(2, 1))
    gpt.embed(torch.tensor([[0] + [image] * n + [1]]), vision)  # as many positions as embeddings: fine
    with pytest.raises(InputError, match=f"prompt has {n - 1} image-token positions .* but {n} vision embeddings"):
        gpt.embed(torch.tensor([[0] + [image] * (n - 1) + [1]]), vision)


TINY = ["--image_size=32", "--sam_dim=16", "--sam_window=4", "--neck_dim=8", "--clip_layers=1", "--n_layer=1",
        "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--batch_size=4", "--n_eval=4", "--eval_batch=4",
        "--log_interval=1", "--max_text_tokens=24", "--bench_tokens=4", "--font_sizes=(10,)", "--max_lines=1"]


def test_a_tiled_run_trains_and_evaluates_pages_larger_than_the_view(tmp_path):
    out = str(tmp_path / "tiled")
    r = run_script("train_ocr.py", TINY + ["--crop_mode=True", "--crop_size=32", "--page_width=64", "--page_height=32",
                                           "--max_steps=2", "--eval_interval=2", "--out_dir=" + out])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(os.path.join(out, "results.json")))
    m = res["metrics"]
    # every page: a 32 px global view (7 tokens) + 2 x 1 crops of 32 px ((2*2+1) * 2); the ratio counts q*q only
    assert m["vision_tokens"] == 7 + 10 and m["vision_tokens_grid"] == 4 + 2 * 4
    assert m["compression"] == pytest.approx(m["text_tokens"] / 12)
    assert m["kv_match"] == 1.0 and "glyphs_loss" in r.stdout  # the glyph heads train on the crops' labels
    assert os.path.exists(os.path.join(out, "ocr_step000002.png"))


@pytest.mark.parametrize("args, match", [
    (["--page_width=64"], "larger than image_size 32: read it with crop_mode=True"),
    (["--crop_mode=True", "--crop_size=16", "--page_width=64"], "crop_size 16 != image_size 32 needs an encoder"),
    (["--crop_mode=True", "--crop_size=20"], "crop_size 20 must be a multiple of 4 \\* sam_patch"),
    (["--crop_mode=True", "--min_crops=3", "--max_crops=2"], "need 1 <= min_crops <= max_crops")])
def test_bad_crop_settings_are_one_line_errors(tmp_path, args, match):
    import re
    r = run_script("train_ocr.py", TINY + args + ["--max_steps=1", "--out_dir=" + str(tmp_path / "x")])
    assert r.returncode != 0 and re.search(match, r.stderr), r.stderr[-500:]
