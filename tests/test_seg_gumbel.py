"""Seg-Gumbel: prompt layout and vp counting, the ST Gumbel estimator, stage-B gradient flow, metrics,
the RefCOCO-style reader and its errors, a short end-to-end run with resume (equal to the uninterrupted run),
eval_only, skipped steps, the opt-in time cap, and config errors."""
import ast
import json
import os
import re
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
import numpy as np  # noqa: E402
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import Tokenizer  # noqa: E402
import data_seg  # noqa: E402
from data_seg import (BOS, IMG, SEG_SPECIALS, SegData, seg_build_model, seg_caption_token_accuracy,  # noqa: E402
                      seg_check_context_counts, seg_ciou, seg_configs, seg_ema_update, seg_giou, seg_iou_stats,
                      seg_load_record, seg_mask_loss, seg_prompt_ids, seg_read_refcoco, seg_region_cells,
                      seg_segment_embeds, seg_st_topk_gumbel, seg_synthetic_sample, seg_vp_batch, seg_vp_prompt_ids)
from inprocess import run_script  # noqa: E402
from model import InputError  # noqa: E402

DATA = SegData()  # the script's default data (synthetic, seed 1337, 32 px, captioned_pool 3000)


def tiny_bundle():
    torch.manual_seed(0)
    vit_cfg, gpt_cfg = seg_configs(vit_layers=1, vit_embd=32, vit_heads=2, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    return seg_build_model(vit_cfg, gpt_cfg, dec_dim=16, llm_grid=4)


def script_defaults():
    """The script's config keys and defaults, as `--help` lists them (the script itself is a flat run)."""
    r = run_script("train_seg_gumbel.py", ["--help"])
    assert r.returncode == 0, r.stderr
    return {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r"^  --(\w+)\s*= (.*)$", r.stdout, re.M)}


def test_special_tokens_by_id():
    tok = Tokenizer(specials=SEG_SPECIALS)
    ids = [tok[s] for s in SEG_SPECIALS + ("<|image|>",)]
    assert len(set(ids)) == len(ids) and min(ids) >= 256
    # text that spells a special token stays text (a string-encoded " [SEG]" would not be the token)
    assert not set(tok.encode("red [SEG] <vp></vp> <|image|>")) & set(ids)
    p = seg_prompt_ids(tok, 4, tok.encode("red circle"))
    assert p[-1] == tok["[SEG]"] and p.count(tok["[SEG]"]) == 1 and p.count(tok["<|image|>"]) == 4
    assert tok.decode(p) == "red circle"


def test_vp_token_count_k0_and_k_positive():
    tok = Tokenizer(specials=SEG_SPECIALS)
    img = tok["<|image|>"]
    small = torch.zeros(32, 32)
    small[5, 5] = 1  # one pixel: no 2x2 cell is more than half covered -> K = 0
    big = torch.zeros(32, 32)
    big[4:20, 8:24] = 1  # 16 x 16 px = 8 x 8 cells
    cells = seg_region_cells(torch.stack([small, big]), 16)
    ks = cells.sum(1).tolist()
    assert ks == [0, 64]
    prompts = [seg_vp_prompt_ids(tok, 16, k) for k in ks]
    assert [p.count(img) for p in prompts] == [16, 80]
    assert prompts[0][-2:] == [tok["<vp>"], tok["</vp>"]]  # K = 0 is a legal, empty region prompt
    ids = torch.full((2, max(map(len, prompts))), tok["<|pad|>"])
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):] = torch.tensor(p)
    assert seg_check_context_counts(ids, img, 16, ks) == [16, 80]
    with pytest.raises(ValueError, match="row 0: the prompt has 16 image-context tokens but 16 image \\+ 1"):
        seg_check_context_counts(ids, img, 16, [1, 64])  # a prompt forced to K >= 1 for an empty region


def test_model_context_tokens_match_embeddings():
    """The real model path: prompt tokens == image rows + visual-prompt rows, for K = 0 and K > 0, and a
    mismatch raises in GPT.embed's scatter."""
    s = tiny_bundle()["student"]
    b = DATA.batch("val", range(2), "cpu")
    b["cells"][0] = False  # K = 0 for the first sample
    feats, img = s.encode(b["images"])
    ids, pad_mask, rows = seg_vp_batch(s, feats, img, b["cells"])
    ks = b["cells"].sum(1).tolist()
    assert ks[0] == 0 and ks[1] > 0
    assert int((ids == IMG).sum()) == rows.shape[0] == 2 * img.shape[1] + sum(ks)
    assert s.gpt.embed(ids, rows).shape == (*ids.shape, img.shape[-1])
    with pytest.raises(ValueError, match="vision token count mismatch"):
        s.gpt.embed(ids, rows[:-1])


def test_st_gumbel_forward_one_hot_backward_soft():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(3, 5, 40).clamp(1e-9, 1 - 1e-9)))
    w = torch.randn(3, 5, 40)
    y = seg_st_topk_gumbel(logits, 0.7, top_k=8, noise=noise)
    assert torch.allclose(y.detach().sum(-1), torch.ones(3, 5))
    assert torch.allclose(y.detach(), torch.nn.functional.one_hot(y.detach().argmax(-1), 40).float(), atol=1e-6)
    top8 = torch.topk(logits.detach(), 8, -1).indices
    assert (top8 == y.detach().argmax(-1, keepdim=True)).any(-1).all()  # the sample is inside the top k
    (g_st,) = torch.autograd.grad((y * w).sum(), logits)
    kth = torch.topk(logits, 8, -1).values[..., -1:]
    soft = torch.softmax((logits.masked_fill(logits < kth, float("-inf")) + noise) / 0.7, -1)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    assert torch.allclose(g_st, g_soft, atol=1e-6) and g_st.abs().sum() > 0
    assert (g_st[logits.detach() < kth.detach()] == 0).all()  # nothing flows to logits outside the top k


def test_stage_b_gradient_reaches_text_embeddings_not_teacher(monkeypatch):
    real, seen = data_seg.seg_st_topk_gumbel, {}

    def spy(logits, tau, top_k, noise=None):  # the estimator itself, with the logits and its noise kept for the check
        logits.retain_grad()
        if noise is None:
            noise = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))
        seen.update(logits=logits, noise=noise, tau=tau, top_k=top_k)
        return real(logits, tau, top_k, noise=noise)
    monkeypatch.setattr(data_seg, "seg_st_topk_gumbel", spy)
    bundle = tiny_bundle()
    s, t = bundle["student"], bundle["teacher"]
    with torch.no_grad():  # GPT blocks start as identity (zero c_proj): no token could see another yet
        for block in list(s.gpt.transformer.h) + list(t.gpt.transformer.h):
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    t.requires_grad_(False)
    b = DATA.batch("train", range(4), "cpu")
    torch.manual_seed(1)
    # distillation off: the mask loss is the only one, so any gradient at the logits came through the estimator
    loss, stats, text = s("stage_b", teacher=t, images=b["images"], masks=b["masks"], cells=b["cells"],
                          distill_weight=0.0)
    assert loss is not None and float(loss.detach()) > 0 and stats["skipped"] == 0
    loss.backward()
    assert text.grad is not None and float(text.grad.norm()) > 0
    assert all(p.grad is None for p in t.parameters())
    # the logits' gradient is the soft sample's backward of dL/dy = dL/dtext @ wte^T, rebuilt here by hand
    logits = seen["logits"]
    assert logits.grad is not None and float(logits.grad.norm()) > 0
    lg = logits.detach().requires_grad_()
    kth = torch.topk(lg.detach(), seen["top_k"], -1).values[..., -1:]
    soft = torch.softmax((lg.masked_fill(lg.detach() < kth, float("-inf")) + seen["noise"]) / seen["tau"], -1)
    (expected,) = torch.autograd.grad((soft * (text.grad @ s.gpt.transformer.wte.weight.detach().T)).sum(), lg)
    assert torch.allclose(logits.grad, expected, atol=1e-7, rtol=1e-4)
    assert s.gpt.lm_head.weight.grad is not None and float(s.gpt.lm_head.weight.grad.norm()) > 0  # via Gumbel
    assert float(s.decoder.hyper[0].weight.grad.norm()) > 0
    before = [p.clone() for p in t.parameters()]
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    seg_ema_update(t, s, 0.9)
    moved = [torch.allclose(p, q + 0.1 * (r - q)) for p, q, r in zip(t.parameters(), before, s.parameters())]
    assert all(moved)


def test_stage_b_noise_is_a_function_of_each_sample():
    """k micro-batches (or DDP ranks) draw for their samples exactly what one batch of them would."""
    whole = data_seg.seg_stage_b_noise(1337, [4, 5, 6, 7], 9, 40, "cpu")
    halves = [data_seg.seg_stage_b_noise(1337, idx, 9, 40, "cpu") for idx in ([4, 5], [6, 7])]
    for k in ("hide", "gumbel"):
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves]))
    assert whole["gumbel"].shape == (4, 9, 40) and not torch.equal(whole["gumbel"][0], whole["gumbel"][1])
    assert not torch.equal(whole["hide"], data_seg.seg_stage_b_noise(1338, [4, 5, 6, 7], 9, 40, "cpu")["hide"])


def test_failed_batch_is_counted_skip_never_zero_loss():
    logits = torch.randn(3, 8, 8)
    empty = torch.zeros(3, 8, 8)
    loss, n_skip = seg_mask_loss(logits, empty)
    assert loss is None and n_skip == 3
    target = empty.clone()
    target[1, 2:5, 2:5] = 1
    loss, n_skip = seg_mask_loss(logits, target)
    ref, _ = seg_mask_loss(logits[1:2], target[1:2])
    assert n_skip == 2 and torch.allclose(loss, ref)  # only the valid sample counts
    # with a step's count (micro-batches): a share of that mean; a micro-batch without a target adds 0, graph kept
    assert torch.allclose(seg_mask_loss(logits, target, count=4)[0], ref / 4)
    zero, n_skip = seg_mask_loss(logits.clone().requires_grad_(), empty, count=4)
    assert n_skip == 3 and float(zero.detach()) == 0.0 and zero.requires_grad
    s = tiny_bundle()["student"]
    ids = torch.tensor([[BOS, IMG, 65]])  # no [SEG]: an error, not a silent zero loss
    with pytest.raises(ValueError, match="exactly one \\[SEG\\]"):
        seg_segment_embeds(s, s.gpt.transformer.wte(ids), None, ids, torch.zeros(1, 64, 32), torch.zeros(1, 3, 32, 32))


def test_mask_metrics_worked_example():
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True            # 4 px
    pred[0, :2, :1] = True          # 2 px inside: I=2, U=4 -> 0.5
    gt[1] = True                    # 16 px
    pred[1, :, :3] = True           # 12 px: I=12, U=16 -> 0.75
    # sample 2: empty target, empty prediction -> IoU 1 (no-target convention), adds nothing to cIoU
    I, U = seg_iou_stats(pred, gt)
    assert I.tolist() == [2, 12, 0] and U.tolist() == [4, 16, 0]
    assert seg_giou(I, U) == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert seg_ciou(I, U) == pytest.approx(14 / 20)
    pred[2, 0, 0] = True            # a false positive on the empty target: IoU 0
    assert seg_giou(*seg_iou_stats(pred, gt)) == pytest.approx((0.5 + 0.75 + 0.0) / 3)


def test_iou_stats_scores_one_hw_mask_whole():
    # one (H, W) mask is one sample (row by row it would be 4 samples: IoUs 1, 0, 1, 1 by the empty rows)
    gt, pred = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    gt[0, :2] = True
    pred[0, :1] = pred[1, 0] = True
    I, U = seg_iou_stats(pred, gt)
    assert I.tolist() == [1] and U.tolist() == [3] and seg_giou(I, U) == pytest.approx(1 / 3)
    assert [t.tolist() for t in seg_iou_stats(pred[None], gt[None])] == [[1], [3]]
    for bad in (torch.zeros(4, dtype=torch.bool), torch.zeros(1, 1, 4, 4, dtype=torch.bool)):
        with pytest.raises(InputError, match="must be \\(H, W\\) or \\(B, H, W\\)"):
            seg_iou_stats(bad, bad)
    with pytest.raises(InputError, match="mask shapes differ"):
        seg_iou_stats(pred, gt[:3])


def test_caption_token_accuracy_worked_example():
    assert seg_caption_token_accuracy([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    # [1, 9] vs [1, 2, 3]: 1 match over the longer length 3; [4, 5, 6, 7] vs [4, 5]: 2 over 4 -> 3 / 7
    assert seg_caption_token_accuracy([[1, 9], [4, 5, 6, 7]], [[1, 2, 3], [4, 5]]) == pytest.approx(3 / 7)
    assert seg_caption_token_accuracy([[]], [[1, 2]]) == 0.0


def test_synthetic_scenes_are_seeded_and_split():
    a, b = seg_synthetic_sample(0, "train", 7), seg_synthetic_sample(0, "train", 7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["caption"] == b["caption"]
    v = seg_synthetic_sample(0, "val", 7)
    assert not torch.equal(a["image"], v["image"])
    for i in range(20):
        s = seg_synthetic_sample(3, "val", i)
        assert s["image"].shape == (3, 32, 32) and s["mask"].sum() >= 20
        colour, kind = s["caption"].split()
        # the target's pixels carry its colour: the caption describes the masked shape
        from data_seg import SEG_COLOURS
        mean = s["image"][:, s["mask"] > 0].mean(1) * 255
        assert torch.allclose(mean, torch.tensor(SEG_COLOURS[colour], dtype=torch.float32), atol=35)


def test_refcoco_reader_polygon_and_mask_png(tmp_path):
    from PIL import Image
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[10:30, 20:40] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    m = np.zeros((40, 60), dtype=np.uint8)
    m[0:20, 0:30] = 255  # the top-left quarter
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    anns = [{"image": "a.png", "segmentation": [[20, 10, 40, 10, 40, 30, 20, 30]],
             "sentences": [{"sent": "the white box"}, "bright square"]},
            {"file_name": "a.png", "mask": "a_mask.png", "sentences": ["top left"]}]
    (tmp_path / "refs.json").write_text(json.dumps({"annotations": anns}))
    recs = seg_read_refcoco(str(tmp_path / "refs.json"))
    assert [r["caption"] for r in recs] == ["the white box", "bright square", "top left"]
    s = seg_load_record(recs[0], 20)  # 60x40 -> 20x20: the box covers x 20..40 -> 6.7..13.3, y 10..30 -> 5..15
    assert s["image"].shape == (3, 20, 20) and s["mask"].shape == (20, 20)
    assert s["mask"][7:13, 8:12].all() and s["mask"][:4].sum() == 0 and s["mask"][:, :5].sum() == 0
    q = seg_load_record(recs[2], 20)
    assert q["mask"][:10, :10].all() and q["mask"][10:].sum() == 0 and q["mask"][:, 10:].sum() == 0
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "segmentation": {"counts": "x"},
                                                    "sentences": ["s"]}]))
    with pytest.raises(InputError, match="RLE"):
        seg_read_refcoco(str(tmp_path / "bad.json"))
    (tmp_path / "bad2.json").write_text(json.dumps([{"image": "a.png", "mask": "a_mask.png"}]))
    with pytest.raises(InputError, match="no referring sentences"):
        seg_read_refcoco(str(tmp_path / "bad2.json"))


@pytest.mark.parametrize("data, error", [
    ([], "non-empty list of annotations, got an empty list"),             # not a ZeroDivisionError in training
    ({"images": [], "refs": []}, "needs an 'annotations' list"),           # not a KeyError
    ([{"image": "a.png", "mask": "a_mask.png", "sentences": "the box"}],   # not 7 one-character captions
     "'sentences' must be a list"),
    ([{"image": "a.png", "mask": "a_mask.png", "sentences": [{"raw": "x"}]}], "non-empty string"),
    ([{"mask": "a_mask.png", "sentences": ["s"]}], "no 'image'"),
])
def test_refcoco_reader_rejects_bad_json(tmp_path, data, error):
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=error) as e:
        seg_read_refcoco(str(tmp_path / "r.json"))
    assert str(tmp_path / "r.json") in str(e.value)  # the message names the file


def test_refcoco_mask_png_0_1_valued_and_empty(tmp_path):
    """A 0/1 mask PNG is the region (it thresholded to nothing at >= 128); an all-zero PNG is an error."""
    from PIL import Image
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 20), dtype=np.uint8)
    m[:10, :10] = 1
    Image.fromarray(m).save(tmp_path / "m01.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "m0.png")
    (tmp_path / "r.json").write_text(json.dumps([{"image": "a.png", "mask": "m01.png", "sentences": ["a"]},
                                                 {"image": "a.png", "mask": "m0.png", "sentences": ["b"]}]))
    recs = seg_read_refcoco(str(tmp_path / "r.json"))
    mask = seg_load_record(recs[0], 20)["mask"]
    assert mask[:10, :10].all() and mask.sum() == 100
    with pytest.raises(InputError, match="m0.png is empty"):
        seg_load_record(recs[1], 20)


def test_short_stage_a_loss_falls():
    s = tiny_bundle()["student"]
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3)
    b = DATA.batch("train", range(8), "cpu")
    losses = []
    for _ in range(25):
        loss, _ = s("stage_a", images=b["images"], masks=b["masks"], caption_ids=b["caption_ids"], cells=b["cells"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


TINY = ["--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--n_layer=1", "--n_embd=32", "--n_head=2",
        "--n_kv_head=2", "--dec_dim=16", "--batch_size=4", "--n_eval=8", "--eval_batch_size=8", "--n_vis=2",
        "--log_interval=2", "--max_caption_len=8"]


def loss_lines(stdout):
    """'step N | loss X | lr Y' of every log line (timings differ from run to run; M of N/M with max_steps)."""
    return [re.sub(r"/\d+", "", " | ".join(ln.split(" | ")[:3])) for ln in stdout.splitlines()
            if re.match(r"step \d+/\d+ \| loss", ln)]


def test_end_to_end_run_and_resume(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    env = dict(OMP_NUM_THREADS="1")
    r = run_script("train_seg_gumbel.py", [f"--out_dir={full}", "--stage_a_steps=4", "--max_steps=8",
                                           "--eval_interval=4"] + TINY, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(os.path.join(full, "results.json")))
    assert res["recipe"] == "seg_gumbel" and res["step"] == 8 and res["stage"] == "B"
    for k in ("giou", "ciou", "cycle_iou", "caption_acc", "giou_drop", "cycle_iou_gain"):
        assert k in res["metrics"]
    assert "giou" in res["stage_a"] and os.path.exists(os.path.join(full, "samples_step00004.png"))
    assert os.path.exists(os.path.join(full, "ckpt", "model.safetensors"))
    # stage B logs its mask loss on its own, and the text-embedding gradient with the step it was measured at
    assert "stage B | seg " in r.stdout and "text-emb grad" in r.stdout and "@ step 5 " in r.stdout
    # stopped after stage A, then resumed: the same losses and the same final model as the run never stopped
    r1 = run_script("train_seg_gumbel.py", [f"--out_dir={part}", "--stage_a_steps=4", "--max_steps=4",
                                            "--eval_interval=4"] + TINY, env=env)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    meta_path = os.path.join(part, "ckpt", "meta.json")
    meta = json.load(open(meta_path))
    meta["train_seconds"] = 1000.0  # as if the first run had trained 1000 s: the resumed clock must go on from it
    json.dump(meta, open(meta_path, "w"))
    r2 = run_script("train_seg_gumbel.py", [f"--out_dir={part}", "--init_from=resume", "--stage_a_steps=4",
                                            "--max_steps=8", "--eval_interval=4"] + TINY + ["--n_layer=2"], env=env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resumed" in r2.stdout and "step 8/8" in r2.stdout
    assert loss_lines(r1.stdout) + loss_lines(r2.stdout) == loss_lines(r.stdout)
    res2 = json.load(open(os.path.join(part, "results.json")))
    assert res2["step"] == 8 and res2["stage_a"] == res["stage_a"] and res2["metrics"] == res["metrics"]
    assert res2["train_seconds"] >= 1000.0
    # the checkpoint's shape wins, is printed, and is what results.json records
    assert "from checkpoint: n_layer=1 (config said 2)" in r2.stdout and res2["config"]["n_layer"] == 1
    # image_size is part of the shape (the ViT's position table): an eval at another size takes the checkpoint's
    r3 = run_script("train_seg_gumbel.py", [f"--out_dir={tmp_path / 'ev'}", f"--init_from={part}/ckpt",
                                            "--eval_only=True", "--image_size=64"] + TINY, env=env)
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert "from checkpoint: image_size=32 (config said 64)" in r3.stdout
    assert json.load(open(tmp_path / "ev" / "results.json"))["metrics"]["giou"] == res["metrics"]["giou"]


def test_skipped_steps_still_eval_checkpoint_and_count(tmp_path):
    """RefCOCO-style data where a mask vanishes at image_size: those steps are counted skips, and the stage-A
    eval and the final eval + checkpoint still happen when they fall on a skipped step."""
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    box = np.zeros((64, 64), dtype=np.uint8)
    box[8:56, 8:56] = 1  # a 0/1-valued mask PNG
    Image.fromarray(box).save(tmp_path / "box.png")
    dot = np.zeros((64, 64), dtype=np.uint8)
    dot[30, 30] = 1  # one pixel: empty at 32 px
    Image.fromarray(dot).save(tmp_path / "dot.png")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "im.png", "mask": "box.png", "sentences": ["box"]},
                                                     {"image": "im.png", "mask": "dot.png", "sentences": ["dot"]}]))
    (tmp_path / "val.json").write_text(json.dumps([{"image": "im.png", "mask": "box.png", "sentences": ["box"]}]))
    out = tmp_path / "run"
    # batch 1, seed 1337: the epoch orders are [0, 1], [0, 1], [1, 0] -> steps 2, 4 (stage A's last) and 5 skip
    data = ["--dataset=refcoco", f"--train_json={tmp_path / 'train.json'}", f"--val_json={tmp_path / 'val.json'}"]
    r = run_script("train_seg_gumbel.py", [f"--out_dir={out}", *data, "--seed=1337", "--stage_a_steps=4",
                                           "--max_steps=5", "--eval_interval=100", "--n_eval=1", "--eval_batch_size=1",
                                           "--n_vis=1"] + TINY[:8] + ["--batch_size=1", "--log_interval=1"],
                   env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [ln.split(" |")[0] for ln in loss_lines(r.stdout)] == ["step 1", "step 3"]
    assert "step 5: batch skipped" in r.stdout and "done: 3 steps skipped, 3 samples" in r.stdout
    res = json.load(open(out / "results.json"))
    assert res["step"] == 5 and res["stage"] == "B" and "giou" in res["stage_a"]
    assert res["metrics"]["skipped_steps"] == 3 and res["metrics"]["skipped"] == 3
    meta = json.load(open(out / "ckpt" / "meta.json"))
    assert meta["step"] == 5 and meta["skipped_steps"] == 3
    assert os.path.exists(out / "samples_step00004.png")


def test_time_cap_stops_saves_and_evaluates(tmp_path):
    """max_train_seconds > 0 (opt-in): the run stops at the first step past the cap, with a checkpoint whose
    train_seconds is the training time, and an eval; the stage boundary stays where the steps put it."""
    out = tmp_path / "cap"
    r = run_script("train_seg_gumbel.py", [f"--out_dir={out}", "--stage_a_steps=4", "--max_steps=8",
                                           "--max_train_seconds=1e-6"] + TINY, env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped at step 1: max_train_seconds=1e-06" in r.stdout and "step 2/8" not in r.stdout
    meta = json.load(open(out / "ckpt" / "meta.json"))
    res = json.load(open(out / "results.json"))
    assert meta["step"] == 1 and meta["train_seconds"] > 0 and res["step"] == 1 and res["stage"] == "A"
    assert "giou" in res["metrics"] and res["train_seconds"] == round(meta["train_seconds"], 1)


@pytest.mark.parametrize("arg, error", [("--gumbel_tau=0", "gumbel_tau"), ("--max_caption_len=0", "max_caption_len"),
                                        ("--vp_grid=0", "vp_grid"), ("--grad_norm_interval=0", "grad_norm_interval"),
                                        ("--stage_a_steps=9", "stage_a_steps")])
def test_bad_config_is_one_line_error(tmp_path, arg, error):
    r = run_script("train_seg_gumbel.py", [f"--out_dir={tmp_path}", "--stage_a_steps=4", "--max_steps=8", arg])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and error in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_configs_match_script_defaults():
    from configurator import parse_args
    defaults = script_defaults()
    assert defaults["max_steps"] == 1200 and defaults["stage_a_steps"] == 700  # the step-exact default run
    assert defaults["max_train_seconds"] == 0.0 and defaults["torch_threads"] == 0
    refcoco = parse_args(defaults, [os.path.join(ROOT, "config/seg_refcoco.py")])
    assert refcoco["dataset"] == "refcoco"
    assert (refcoco["image_size"] // refcoco["patch_size"]) % refcoco["llm_grid"] == 0
    with open(os.path.join(ROOT, "config/seg_refcoco.py")) as f:  # a config file holds only what differs
        source = f.read()
    from configurator import assigned_names
    assert not [k for k in assigned_names(source) if refcoco[k] == defaults[k]]


def test_captioned_pool_stage_a_repeats_stage_b_is_fresh():
    """captioned_pool=N: stage A only ever sees the first N captioned scenes; stage B never sees them."""
    data = SegData(captioned_pool=3)
    a = data.batch("train", range(6), "cpu", "A")
    b = data.batch("train", range(3), "cpu", "B")
    first = DATA.batch("train", range(3), "cpu")
    assert torch.equal(a["images"][:3], a["images"][3:]) and torch.equal(a["images"][:3], first["images"])
    assert not any(torch.equal(x, y) for x in b["images"] for y in first["images"])
    assert torch.equal(b["images"], DATA.batch("train", range(3, 6), "cpu")["images"])
