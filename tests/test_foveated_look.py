"""Foveated, learning where to look without labels: the hard top-k glimpse read (value, straight-through gradient,
Gumbel draws), the contrast push, and the attention-peak diagnostic on hand-made maps."""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_foveated import fov_metrics  # noqa: E402
from model import top_k_attention  # noqa: E402
from test_foveated import tiny_model, tiny_targets  # noqa: E402


def test_top_k_attention_value_is_the_softmax_over_the_k_best_patches_and_the_other_keys():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 1, 1 + 8 + 1)  # (B, heads, Q, [class, 8 patches, the query itself])
    att, _ = top_k_attention(scores, 1, 9, k=2)
    best = scores[..., 1:9].mean(1, keepdim=True).topk(2, -1).indices  # picked once for every head
    for b in range(2):
        keep = [0, 9] + [1 + i for i in best[b, 0, 0].tolist()]
        for h in range(3):
            expect = torch.zeros(10)
            expect[keep] = scores[b, h, 0, keep].softmax(-1)
            assert torch.allclose(att[b, h, 0], expect, atol=1e-6)
    assert ((att[..., 1:9] > 0).sum(-1) == 2).all()


def test_top_k_attention_gradient_is_the_full_softmaxs():
    torch.manual_seed(1)
    scores = torch.randn(2, 2, 1, 6)
    weights = torch.randn(2, 2, 1, 6)
    s1 = scores.clone().requires_grad_(True)
    (top_k_attention(s1, 0, 6, k=2)[0] * weights).sum().backward()
    s2 = scores.clone().requires_grad_(True)
    (s2.softmax(-1) * weights).sum().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    assert (s1.grad[..., :] != 0).all()  # patches outside the k learn too


def test_gumbel_top_1_draws_patches_as_often_as_the_softmax_says():
    torch.manual_seed(2)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    scores = logits.expand(20000, 1, 1, 4).contiguous()
    att, logp = top_k_attention(scores, 0, 4, k=1, gumbel=True)
    freq = (att[:, 0, 0] > 0.5).float().mean(0)
    assert torch.allclose(freq, logits.softmax(-1), atol=0.015), freq
    assert not torch.equal(att, top_k_attention(scores, 0, 4, k=1)[0])  # without gumbel: always the best
    # the pick's log-probability is the log-softmax of the patch drawn
    drawn = att[:, 0, 0].argmax(-1)
    assert torch.allclose(logp[:, 0], logits.log_softmax(-1)[drawn], atol=1e-6)


def test_gumbel_top_2_draws_ordered_pairs_with_their_plackett_luce_probability():
    torch.manual_seed(3)
    logits = torch.tensor([1.5, 0.5, 0.0])
    p = logits.softmax(-1)
    scores = logits.expand(30000, 1, 1, 3).contiguous()
    _, logp = top_k_attention(scores, 0, 3, k=2, gumbel=True)
    pairs = {}
    for a in range(3):
        for b in range(3):
            if a != b:  # first a, then b among the rest
                pairs[(a, b)] = (p[a] * p[b] / (1 - p[a])).log().item()
    # each draw's log-probability is its ordered pair's; the pair's frequency is its probability
    seen = {}
    for lp in logp[:, 0].tolist():
        match = [ab for ab, v in pairs.items() if abs(v - lp) < 1e-4]
        assert match, lp
        seen[match[0]] = seen.get(match[0], 0) + 1
    for ab, v in pairs.items():
        assert abs(seen.get(ab, 0) / 30000 - math.exp(v)) < 0.015, (ab, seen.get(ab, 0) / 30000, math.exp(v))


def test_top_k_reads_see_k_patches_per_layer_and_gumbel_only_in_training():
    ns, model, frames, _ = tiny_model("--read_top_k=2", "--read_gumbel=True", "--look_weight=0")
    cache = model.encode(frames)
    q = torch.randn(2, 4, model.q_static.shape[-1])
    model.eval()
    _, a1 = model.read(cache, q)
    _, a2 = model.read(cache, q)
    assert torch.equal(a1, a2)  # eval: the k best, no draw
    # deep queries read every layer; each layer's map has 2 nonzero patches, so the mean has at most 2 per layer
    assert ((a1 > 0).sum(-1) <= 2 * len(model.vit.blocks)).all()
    model.train()
    torch.manual_seed(0)
    _, a3 = model.read(cache, q)
    torch.manual_seed(1)
    _, a4 = model.read(cache, q)
    assert not torch.equal(a3, a4)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_contrast_push_is_the_fine_and_coarse_reads_cosine_after_frame_0(weight):
    ns, model, frames, _ = tiny_model(f"--contrast_weight={weight}", "--look_weight=0", "--read_weight=0")
    r = model(frames, tiny_targets(ns, model))
    plain = r["loss_fine"] + r["loss_coarse"]
    cos = torch.nn.functional.cosine_similarity(r["z_fine"][:, 1:], r["z_coarse"][:, 1:], dim=-1).mean()
    assert torch.allclose(r["loss"], plain + weight * cos, atol=1e-6)


def test_attention_peak_on_target_worked_example():
    # 2 videos x 2 frames over a 4x4 patch grid (16 px frames, 4 px patches, a 4 px target at (4, 4): patch 5)
    maps = torch.full((2, 2, 16), 0.01)
    maps[0, 1, 5] = 0.5       # video 0, frame 1: peak on the target
    maps[1, 1, 6] = 0.5       # video 1, frame 1: peak beside it
    coarse = torch.full((2, 2, 16), 1 / 16)
    coarse[:, 1, 0] = 0.2     # the static read's peak is always patch 0
    xy = torch.tensor([[4, 4]]).expand(2, 2, 2)
    a = dict(pf=torch.zeros(2, 1, 3), pc=torch.zeros(2, 1, 3), tg=torch.ones(2, 1, 3), all=torch.ones(2, 2, 3),
             zf=torch.randn(2, 2, 5), zc=torch.randn(2, 2, 5), af=maps, ac=coarse, xy=xy)
    m, _ = fov_metrics(a, 16, 4, target_size=4)
    assert m["target_peak_fine"] == pytest.approx(0.5)
    assert m["target_peak_coarse"] == pytest.approx(0.0)


def test_policy_loss_rewards_the_fine_reads_gain_and_the_static_reads_own_error():
    ns, model, _, _ = tiny_model("--read_top_k=2", "--read_gumbel=True", "--reinforce_weight=1", "--look_weight=0")
    tgt = torch.zeros(2, 3, 1)
    pred_c = torch.tensor([[[1.0], [1.0]], [[1.0], [3.0]]])  # static errors per video, frame: [[1, 1], [1, 9]]
    pred_f = torch.tensor([[[0.0], [1.0]], [[1.0], [2.0]]])  # fine errors [[0, 1], [1, 4]]: gains [[1, 0], [0, 5]]
    logp_f = torch.zeros(2, 3, requires_grad=True)
    logp_c = torch.zeros(2, 3, requires_grad=True)
    ns["FoveatedVLM"].policy_loss(pred_f, pred_c, tgt, logp_f, logp_c).backward()
    # two videos: a frame's advantages are +-(difference / 2) / (the unbiased std |difference| / sqrt 2) = +-0.707;
    # the loss is -(advantage x logp) averaged over 2 videos x 2 frames (the last frame's read predicts nothing)
    a = 2 ** -0.5
    # frame 0: video 0 gained more (1 vs 0); frame 1: video 1 (5 vs 0)
    assert torch.allclose(logp_f.grad, -torch.tensor([[a, -a, 0], [-a, a, 0]]) / 4, atol=1e-5)
    # the static read: frame 0's errors are equal (no advantage); in frame 1 video 0 erred less
    assert torch.allclose(logp_c.grad, -torch.tensor([[0, a, 0], [0, -a, 0]]) / 4, atol=1e-5)
    # --reinforce_static=False: the fine term alone, the same gradient
    fine_only = logp_f.detach().clone().requires_grad_(True)
    ns["FoveatedVLM"].policy_loss(pred_f, pred_c, tgt, fine_only, None).backward()
    assert torch.allclose(fine_only.grad, logp_f.grad)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_policy_gradient_is_added_only_when_weighted_and_only_in_training(weight):
    ns, model, frames, _ = tiny_model("--read_top_k=2", "--read_gumbel=True", f"--reinforce_weight={weight}",
                                      "--look_weight=0", "--read_weight=0", "--recurrent=True")
    tgt = tiny_targets(ns, model)
    torch.manual_seed(5)
    r = model(frames, tgt)
    extra = (r["loss"] - r["loss_fine"] - r["loss_coarse"]).abs().item()
    assert (extra > 1e-6) == (weight > 0)
    if weight:  # the static read's term off: the same draws (same seed), a different policy term
        model.reinforce_static = False
        torch.manual_seed(5)
        r2 = model(frames, tgt)
        assert torch.equal(r2["loss_fine"], r["loss_fine"]) and not torch.allclose(r2["loss"], r["loss"])
        model.reinforce_static = True
    model.eval()
    r = model(frames, tgt)
    assert torch.allclose(r["loss"], r["loss_fine"] + r["loss_coarse"], atol=1e-6)
