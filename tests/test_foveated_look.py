"""Foveated, learning where to look without labels: the hard top-k glimpse read (value, straight-through gradient,
Gumbel draws), the contrast push, and the attention-peak diagnostic on hand-made maps."""
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
