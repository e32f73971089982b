"""Foveated recipe: query init scale and the projection without bias, one mode per batch, both cache layouts in
training, captioning and generation, diagnostics on hand-made maps, data, encoders, and end-to-end runs: resume
equals an uninterrupted run, eval_only, a resumed time budget, bad input."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import sample_rng  # noqa: E402
from data_foveated import (FovFixedEncoder, FovTaesdEncoder, fov_attention_stats, fov_check_clip,  # noqa: E402
                           fov_clip_split, fov_cosine, fov_folder_batch, fov_hollow_warnings, fov_latent_encoder,
                           fov_list_clips, fov_load_clip, fov_load_vit_init, fov_look_loss, fov_per_frame_mse,
                           fov_pick_mode, fov_synthetic_video, fov_target_hit)
from model import InputError  # noqa: E402
from inprocess import run_script  # noqa: E402

TINY = ["--device=cpu", "--n_frames=4", "--image_size=16", "--vit_layers=2", "--vit_width=32", "--n_embd=32",
        "--n_layer=1", "--query_dim=32", "--latent_channels=4", "--n_distractors=2", "--max_train_seconds=0"]


def recipe(*overrides):
    """The definitions of train_foveated.py (everything above the run) under these overrides."""
    src = open(os.path.join(ROOT, "train_foveated.py")).read().split("# == the run")[0]
    argv, sys.argv = sys.argv, ["train_foveated.py", *TINY, *overrides]
    try:
        ns = {"__file__": os.path.join(ROOT, "train_foveated.py"), "__name__": "foveated_defs"}
        exec(compile(src, "train_foveated.py", "exec"), ns)
    finally:
        sys.argv = argv
    return ns


def tiny_batch(ns, n=2):
    b = ns["get_batch"]("train", range(n))
    return b["frames"], b["captions"]


def tiny_model(*overrides):
    """The tiny recipe under these overrides, a seeded model and a batch: (ns, model, frames, captions)."""
    ns = recipe(*overrides)
    torch.manual_seed(0)
    model, _ = ns["build_model"]()
    return (ns, model) + tiny_batch(ns)


def tiny_targets(ns, model, n=2):
    return model.latents(ns["get_batch"]("train", range(n))["latent_frames"], ns["latent_enc"])

# -- queries: init scale, projection without bias, location maps


def test_query_init_std_one_and_projection_without_bias():
    ns = recipe("--query_dim=512")
    torch.manual_seed(0)
    model, _ = ns["build_model"]()
    assert model.q_static.shape == (1, 512)
    assert 0.9 < model.q_static.std().item() < 1.1  # std 1.0 (at 0.02 every query read the same average)
    assert 0.9 < model.q_init.std().item() < 1.1
    assert model.query_input_proj.bias is None
    # different queries must read different things
    frames, _ = tiny_batch(ns)
    cache = model.encode(frames)
    q = torch.randn(2, 2, frames.shape[1], 512)
    z1, a1 = model.read(cache, q[0])
    z2, a2 = model.read(cache, q[1])
    assert (a1 - a2).abs().sum(-1).mean() > 0.05
    assert fov_cosine(z1, z2) < 0.99


def test_a_sharp_location_map_reads_where_it_points():
    """glimpse=True: the last N numbers of a query are logits over the N patches, added (as log-probabilities)
    to the read's logits. A sharp map puts nearly all attention on its patch, whatever the content; a flat map
    changes nothing; too short a query for the map is a clear error."""
    ns = recipe("--glimpse=True", "--query_dim=24")
    torch.manual_seed(0)
    model, meta = ns["build_model"]()
    assert meta["foveated"]["glimpse"] is True and model.n_patches == 16  # 16 px frames, 4 px patches
    frames, _ = tiny_batch(ns)
    cache = model.encode(frames)
    T = frames.shape[1]
    q = torch.randn(2, T, 24)
    q[..., -16:] = 0.0
    flat_z, flat_att = model.read(cache, q)
    q[..., -16 + 9] = 30.0  # patch 9 (row 2, column 1)
    assert torch.allclose(model.glimpse_log_map(q)[..., 9].exp(), torch.ones(2, T))
    _, att = model.read(cache, q)
    att = att / att.sum(-1, keepdim=True)  # of the mass on patches (the rest is the query's own token)
    assert (att.argmax(-1) == 9).all() and att[..., 9].min() > 0.99
    # a flat map is no prior: the same read as the model without the glimpse
    ns_off = recipe("--glimpse=False", "--query_dim=24")
    torch.manual_seed(0)
    model_off, _ = ns_off["build_model"]()
    q[..., -16:] = 0.0
    off_z, off_att = model_off.read(model_off.encode(frames), q)
    assert torch.allclose(flat_z, off_z, atol=1e-5) and torch.allclose(flat_att, off_att, atol=1e-6)
    assert (off_att / off_att.sum(-1, keepdim=True)).max() < 0.9
    with pytest.raises(InputError, match="query_dim must exceed 16"):
        recipe("--glimpse=True", "--query_dim=16")["build_model"]()


# -- one mode per batch


def test_mode_is_chosen_per_batch_with_the_configured_weights():
    modes = [fov_pick_mode(1337, s, (0.6, 0.2, 0.2)) for s in range(3000)]
    assert modes == [fov_pick_mode(1337, s, (0.6, 0.2, 0.2)) for s in range(3000)]  # pure function of step
    share = {m: modes.count(m) / len(modes) for m in ("video", "text", "caption")}
    assert abs(share["video"] - 0.6) < 0.04 and abs(share["text"] - 0.2) < 0.03 and abs(share["caption"] - 0.2) < 0.03
    assert {fov_pick_mode(0, s, (0, 0, 1)) for s in range(50)} == {"caption"}
    with pytest.raises(ValueError):
        fov_pick_mode(0, 0, (0.5, 0.5))
    # one mode covers the whole batch: the forward takes one mode string, never one per sample
    ns = recipe()
    model, _ = ns["build_model"]()
    frames, caps = tiny_batch(ns, 3)
    with pytest.raises(InputError):
        model(frames, tiny_targets(ns, model, 3), ["video", "text", "caption"], caps)

# -- gradient accumulation and activation checkpointing


def step_grads(model, b, tgt, caps, parts, caption_count=None):
    """One step over the micro-batches `parts` (slices of the batch), each loss / len(parts) -> (loss, grads)."""
    model.zero_grad()
    total = 0.0
    for part in parts:
        r = model(b["frames"][part], tgt[part], "caption", caps[part], caption_count=caption_count)
        (r["loss"] / len(parts)).backward()
        total += r["loss"].item() / len(parts)
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_caption_micro_batches_equal_one_batch():
    """Captions of different lengths: two micro-batches of 2 equal one batch of 4 only when the caption loss is a
    mean over the step's caption tokens (caption_count), not the mean of the micro-batches' means."""
    ns = recipe()
    torch.manual_seed(0)
    model, _ = ns["build_model"]()
    b = ns["get_batch"]("train", range(4))
    caps = ["a", "a red ball moves left", "two", "the small square turns blue and stops"]
    tgt = model.latents(b["latent_frames"], ns["latent_enc"])
    halves = [slice(0, 2), slice(2, 4)]
    whole, g_whole = step_grads(model, b, tgt, caps, [slice(0, 4)])
    micro, g_micro = step_grads(model, b, tgt, caps, halves, ns["caption_targets"](caps) / 2)
    assert micro == pytest.approx(whole, rel=1e-5) and g_micro.keys() == g_whole.keys()
    assert all(torch.allclose(g_micro[n], g_whole[n], atol=1e-6) for n in g_whole)
    naive, _ = step_grads(model, b, tgt, caps, halves)
    assert abs(naive - whole) > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    from model import set_checkpointing
    ns, model, frames, caps = tiny_model()
    tgt = tiny_targets(ns, model)
    b = dict(frames=frames)
    runs = []
    for on in (False, True):
        set_checkpointing(model, on)
        assert model.vit.checkpointing == model.gpt.checkpointing == on
        runs.append(step_grads(model, b, tgt, caps, [slice(0, 2)]))
    (plain, g0), (ckpt, g1) = runs
    assert plain == pytest.approx(ckpt, rel=1e-6) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


# -- both cache layouts in training, captioning and generation


@pytest.mark.parametrize("query_mode", ["deep", "shallow"])
def test_both_cache_layouts_in_every_path(query_mode):
    ns = recipe(f"--query_mode={query_mode}", "--n_passes=2")
    torch.manual_seed(0)
    model, meta = ns["build_model"]()
    assert meta["vit"]["query_mode"] == query_mode
    frames, caps = tiny_batch(ns)
    cache = model.encode(frames)
    n_none = sum(kv is None for kv in cache["kv"])
    assert n_none == (0 if query_mode == "deep" else len(cache["kv"]) - 1)
    _, maps = model.vit.read(model.query_input_proj(model.q_static.expand(8, 1, -1)), cache)
    assert len(maps) == (2 if query_mode == "deep" else 1)
    tgt = tiny_targets(ns, model)
    for mode in ("video", "text", "caption"):  # training / text-conditioned / captioning
        model.zero_grad()
        r = model(frames, tgt, mode, caps, n_passes=2)
        assert torch.isfinite(r["loss"])
        assert (r["loss_caption"] is not None) == (mode == "caption")
        r["loss"].backward()
        assert model.q_static.grad is not None and model.q_static.grad.abs().sum() > 0
        assert model.query_head.weight.grad.abs().sum() > 0  # the fine loss reaches the query predictor
    gen = model.caption(frames, 6, n_passes=2)  # caption generation through the KV-cached GPT
    assert len(gen) == 2 and all(isinstance(g, str) for g in gen)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_coarse_keeps_the_fine_loss_out_of_the_coarse_pass(detach):
    ns, model, frames, caps = tiny_model(f"--detach_coarse={detach}")
    r = model(frames, tiny_targets(ns, model), "video", caps)
    r["loss_fine"].backward()
    assert model.query_head.weight.grad.abs().sum() > 0  # the fine loss always trains the query predictor
    reached = model.q_static.grad is not None and model.q_static.grad.abs().sum() > 0
    assert reached == (not detach)


@pytest.mark.parametrize("read_weight", [0.0, 1.0])
def test_read_loss_is_added_only_when_weighted(read_weight):
    """read_weight > 0: each path's read of frame t must also give frame t's own latent (one shared head)."""
    # read_skip off: the skip would train read_head too
    ns, model, frames, caps = tiny_model(f"--read_weight={read_weight}", "--read_skip=False")
    tgt = tiny_targets(ns, model)
    r = model(frames, tgt, "video", caps)
    z_f, z_c = r["z_fine"], r["z_coarse"]
    want_f = torch.nn.functional.mse_loss(model.read_head(z_f), tgt)
    assert torch.allclose(r["loss_read_fine"], want_f)
    assert torch.allclose(r["loss_read_coarse"], torch.nn.functional.mse_loss(model.read_head(z_c), tgt))
    assert torch.allclose(r["loss"], r["loss_fine"] + r["loss_coarse"] +
                          read_weight * (r["loss_read_fine"] + r["loss_read_coarse"]))
    r["loss"].backward()
    trained = model.read_head.weight.grad is not None and model.read_head.weight.grad.abs().sum() > 0
    assert trained == (read_weight > 0)


@pytest.mark.parametrize("mode", ["video", "text"])
def test_recurrent_reads_equal_n_passes_equal_to_the_number_of_frames(mode):
    """recurrent=True reads frame t with the query predicted from the fine reads of frames < t: the fixed point
    of the parallel passes, reached after n_frames of them. Same weights -> the same predictions."""
    ns, model, frames, caps = tiny_model("--fine_proj=True", "--read_skip=True")
    model.eval()
    tgt = tiny_targets(ns, model)
    T = frames.shape[1]
    with torch.no_grad():
        passes = model(frames, tgt, mode, caps, n_passes=T)
        one = model(frames, tgt, mode, caps, n_passes=1)
        model.recurrent = True
        loop = model(frames, tgt, mode, caps)
    assert torch.allclose(loop["queries"], passes["queries"], atol=1e-5)
    assert torch.allclose(loop["pred_fine"], passes["pred_fine"], atol=1e-5)
    assert not torch.allclose(loop["pred_fine"], one["pred_fine"], atol=1e-3)  # one pass is not there yet
    assert torch.equal(loop["pred_coarse"], passes["pred_coarse"])  # the static-query baseline is untouched
    gen = model.caption(frames, 4)  # generation reads the frames the same way
    assert len(gen) == 2
    with pytest.raises(InputError, match="n_passes=1"):
        recipe("--recurrent=True", "--n_passes=2")


@pytest.mark.parametrize("recurrent", [False, True])
def test_oracle_look_puts_the_fine_reads_on_the_target(recurrent):
    """The diagnostic's prior: the fine reads (never the static query's) land on the target's patches."""
    ns = recipe("--oracle_look=True", f"--recurrent={recurrent}")
    torch.manual_seed(0)
    model, _ = ns["build_model"]()
    b = ns["get_batch"]("train", range(2))
    tgt = model.latents(b["latent_frames"], ns["latent_enc"])
    hit = lambda maps: fov_target_hit(maps, b["target_xy"], b["target_size"], 16, 4)  # noqa: E731
    with torch.no_grad():
        seen = model(b["frames"], tgt, "video", look=b["look"])
        blind = model(b["frames"], tgt, "video")
    assert hit(seen["att_fine"]) > 0.5 and hit(seen["att_fine"]) > 3 * hit(blind["att_fine"])
    assert torch.equal(seen["att_coarse"], blind["att_coarse"])
    with pytest.raises(InputError, match="oracle_look"):
        recipe("--oracle_look=True", "--task=folder", "--data_dir=x", "--look_weight=0")


def test_look_loss_worked_examples():
    """-log(attention mass on the target's patches), mean over frames 1.. (frame 0 is never counted)."""
    target = torch.zeros(1, 3, 4, dtype=torch.bool)
    target[:, :, 1] = True
    maps = torch.tensor([[[1.0, 0, 0, 0],  # frame 0: no mass on the target, but not counted
                          [0.0, 1, 0, 0],  # all of it: -log 1 = 0
                          [0.25, 0.5, 0.25, 0]]])  # half: -log 0.5
    assert fov_look_loss(maps, target).item() == pytest.approx(math.log(2) / 2, abs=1e-4)


def test_look_loss_trains_both_paths_queries_and_never_reaches_eval():
    """look_weight: the reads of both paths are pulled toward the target's patches in training (gradient on
    q_static and on the predicted queries' head); eval batches carry no positions into the model."""
    ns = recipe("--look_weight=1.0")
    torch.manual_seed(0)
    model, _ = ns["build_model"]()
    b = ns["get_batch"]("train", range(2))
    assert b["target_patches"] is not None and b["look"] is None  # the positions are never a prior
    tgt = model.latents(b["latent_frames"], ns["latent_enc"])
    with_look = model(b["frames"], tgt, "video", target_patches=b["target_patches"])
    plain = model(b["frames"], tgt, "video")
    expected = fov_look_loss(with_look["att_fine"], b["target_patches"]) + \
        fov_look_loss(with_look["att_coarse"], b["target_patches"])
    assert plain["loss_look"] is None and with_look["loss_look"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (with_look["loss"] - plain["loss"]).item() == pytest.approx(expected.item(), rel=1e-4)
    with_look["loss_look"].backward()
    assert model.q_static.grad.abs().sum() > 0 and model.query_head.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="look_weight"):
        recipe("--look_weight=1.0", "--task=folder", "--data_dir=x")


@pytest.mark.parametrize("read_skip", [False, True])
def test_read_skip_adds_what_the_read_sees_now_to_the_prediction(read_skip):
    ns, model, frames, caps = tiny_model(f"--read_skip={read_skip}")
    with torch.no_grad():  # silence the GPT's own prediction: what is left is the skip
        model.latent_head.weight.zero_()
        model.latent_head.bias.zero_()
    r = model(frames, tiny_targets(ns, model), "video", caps)
    for path in ("fine", "coarse"):
        skip = model.read_head(r[f"z_{path}"][:, :-1])
        want = skip if read_skip else torch.zeros_like(skip)
        assert torch.allclose(r[f"pred_{path}"], want)


@pytest.mark.parametrize("fine_proj", [False, True])
def test_fine_proj_gives_the_fine_reads_their_own_projector(fine_proj):
    ns, model, frames, caps = tiny_model(f"--fine_proj={fine_proj}")
    model(frames, tiny_targets(ns, model), "video", caps)["loss_fine"].backward()
    proj_grad = model.proj[0].weight.grad
    if fine_proj:  # the fine loss enters through proj_fine only (the coarse pass is detached by default)
        assert model.proj_fine[0].weight.grad.abs().sum() > 0
        assert proj_grad is None or proj_grad.abs().sum() == 0
    else:
        assert model.proj_fine is None and proj_grad.abs().sum() > 0
    assert len(model.caption(frames, 4, n_passes=2)) == 2  # generation reads the fine rows the same way


def test_a_cache_of_the_wrong_layout_is_a_clear_error():
    deep, shallow = recipe("--query_mode=deep"), recipe("--query_mode=shallow")
    m_deep, _ = deep["build_model"]()
    m_shallow, _ = shallow["build_model"]()
    frames, _ = tiny_batch(deep)
    q = torch.randn(2, frames.shape[1], 32)
    m_shallow.read(m_deep.encode(frames), q)  # a full cache serves a shallow read
    with pytest.raises(InputError, match="shallow layout"):
        m_deep.read(m_shallow.encode(frames), q)

# -- diagnostics on hand-made attention maps


def test_attention_stats_on_hand_made_maps():
    uniform4 = torch.zeros(16)
    uniform4[[0, 1, 4, 5]] = 0.25
    ent, mx = fov_attention_stats(uniform4[None])
    assert ent == pytest.approx(math.log(4), abs=1e-5) and mx == pytest.approx(0.25)
    onehot = torch.zeros(16)
    onehot[7] = 1
    ent, mx = fov_attention_stats(torch.stack([onehot, torch.full((16,), 1 / 16)]))
    assert ent == pytest.approx(math.log(16) / 2, abs=1e-5) and mx == pytest.approx((1 + 1 / 16) / 2)
    # attention mass on the target: 4x4 patches of 4 px, a 4 px target at (4, 4) covers patch 5 only
    maps = uniform4.view(1, 1, 16)
    assert fov_target_hit(maps, torch.tensor([[[4, 4]]]), 4, 16, 4) == pytest.approx(0.25)
    # at (2, 2) it straddles patches 0, 1, 4, 5: all of the mass
    assert fov_target_hit(maps, torch.tensor([[[2, 2]]]), 4, 16, 4) == pytest.approx(1.0)


def test_cosine_and_per_frame_loss_worked_examples():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert fov_cosine(a, b) == pytest.approx(0.5)  # (0 + 1) / 2
    pred = torch.zeros(2, 3, 2)
    tgt = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]] * 2)
    assert fov_per_frame_mse(pred, tgt) == pytest.approx([0.0, 1.0, 2.0])

# -- data and latent encoders


def boxes(xy, size):
    """(H, W) bool mask of size x size boxes at these top-left corners."""
    m = torch.zeros(32, 32, dtype=torch.bool)
    for x, y in xy:
        m[y:y + size, x:x + size] = True
    return m


def test_synthetic_video_is_seeded_and_every_sprite_moves_and_changes_colour():
    v1 = fov_synthetic_video(sample_rng(1, "train", 5), noise=0.0, specks=0)
    v2 = fov_synthetic_video(sample_rng(1, "train", 5), noise=0.0, specks=0)
    v3 = fov_synthetic_video(sample_rng(1, "val", 5), noise=0.0, specks=0)
    assert torch.equal(v1["frames"], v2["frames"]) and not torch.equal(v1["frames"], v3["frames"])
    f, xy, dxy = v1["frames"], v1["target_xy"], v1["distractor_xy"]
    assert f.shape == (8, 3, 32, 32) and 0 <= f.min() and f.max() <= 1 and dxy.shape == (8, 3, 2)
    assert (xy[1:] - xy[:-1]).abs().sum(-1).min() >= 1  # the target moves every frame
    assert ((dxy[1:] - dxy[:-1]).abs().sum(-1) >= 1).all()  # and so does every distractor (look-alike motion)
    # everything that changes between two frames lies under some sprite's old or new box: the background is still
    changed = (f[3] - f[2]).abs().sum(0) > 1e-6  # after the cue frames (0, 1)
    sprites = boxes(xy[2:4].tolist() + dxy[2:4].flatten(0, 1).tolist(), 4)
    assert changed.any() and not (changed & ~sprites).any()
    cue = (f[0] == 1).all(0)  # the white outline of the cue frames rings the target
    x, y = xy[0].tolist()
    assert cue[max(0, y - 1):y + 5, max(0, x - 1):x + 5].sum() >= 8 and not (f[2] == 1).all(0).any()
    assert xy[0].tolist() == [14, 14]  # center_start
    words = v1["caption"].split()
    assert len(words) == 4 and words[2] == "moving"
    still = fov_synthetic_video(sample_rng(1, "train", 5), task="static_large", noise=0.0, specks=0)
    assert (still["target_xy"] == still["target_xy"][0]).all() and still["caption"].startswith("large ")
    # distractors switch colour at the target's rate: count switches of every sprite over many videos
    vids = [fov_synthetic_video(sample_rng(2, "train", i), noise=0.0, specks=0, p_change=0.5, cue_frames=0)
            for i in range(60)]
    tgt_rate = np.mean([(v["target_color"][1:] != v["target_color"][:-1]).float().mean().item() for v in vids])
    assert abs(tgt_rate - 0.5) < 0.1
    # a distractor's mean colour in the frame moves as often as the target's (its box, where it is alone)
    d_rate = []
    for v in vids:
        for t in range(7):
            x0, y0 = v["distractor_xy"][t, 0].tolist()
            x1, y1 = v["distractor_xy"][t + 1, 0].tolist()
            others = v["target_xy"][t:t + 2].tolist() + v["distractor_xy"][t:t + 2, 1:].flatten(0, 1).tolist()
            if any(abs(x - a) < 5 and abs(y - b) < 5 for a, b in others for x, y in ((x0, y0), (x1, y1))):
                continue  # overlapped: cannot read its colour cleanly
            c0 = v["frames"][t, :, y0:y0 + 4, x0:x0 + 4].amax((1, 2))
            c1 = v["frames"][t + 1, :, y1:y1 + 4, x1:x1 + 4].amax((1, 2))
            d_rate.append(float((c0 - c1).abs().max() > 1e-4))
    assert len(d_rate) > 100 and abs(np.mean(d_rate) - 0.5) < 0.12


def test_jitter_kicks_every_sprite_off_its_straight_course():
    """jitter=0 is pure momentum (the same videos as before the option); jitter > 0 changes velocities at
    random within 1-3 px/frame, so extrapolating the cue's motion drifts from where the target goes."""
    def drift(v):  # how far the target ends from a straight-line extrapolation of frames 1-2 (no bounces)
        xy = v["target_xy"].float()
        return (xy[2] + 5 * (xy[2] - xy[1]) - xy[7]).abs().sum().item()
    kw = dict(noise=0.0, specks=0, center_start=True)
    plain = [fov_synthetic_video(sample_rng(3, "train", i), **kw) for i in range(40)]
    again = [fov_synthetic_video(sample_rng(3, "train", i), jitter=0.0, **kw) for i in range(40)]
    kicked = [fov_synthetic_video(sample_rng(3, "train", i), jitter=0.8, **kw) for i in range(40)]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(plain, again))
    assert np.mean([drift(v) for v in kicked]) > np.mean([drift(v) for v in plain]) + 2
    steps = torch.cat([(v["target_xy"][1:] - v["target_xy"][:-1]).float().norm(dim=-1) for v in kicked])
    assert steps.max() <= 3 + 2 ** 0.5 + 1e-6  # speed <= 3; rounding to whole pixels adds <= 1 px per axis
    still = fov_synthetic_video(sample_rng(3, "train", 0), task="static_large", jitter=0.8, **kw)
    assert (still["target_xy"] == still["target_xy"][0]).all()  # the control's target stays still


def test_target_layer_holds_the_target_alone_as_it_looks_in_the_frame():
    v = fov_synthetic_video(sample_rng(1, "train", 7), noise=0.0, specks=0)
    f, layer, xy = v["frames"], v["target_layer"], v["target_xy"]
    assert layer.shape == f.shape
    for t in range(8):
        x, y = xy[t].tolist()
        on = layer[t].abs().sum(0) > 0
        assert torch.equal(on, boxes([(x, y)], 4))  # only the target's box, black elsewhere (no cue, no clutter)
        assert torch.equal(layer[t, :, y:y + 4, x:x + 4], f[t, :, y:y + 4, x:x + 4])  # drawn on top: as seen
    big = fov_synthetic_video(sample_rng(1, "train", 7), task="static_large", noise=0.0, specks=0)
    assert (big["target_layer"][0].abs().sum(0) > 0).sum() == 16 * 16


@pytest.mark.parametrize("target,dim", [("target_layer", 4 * 2 * 2), ("delta", 4 * 2 * 2), ("frame", 4 * 3 * 3)])
def test_latent_target_options(target, dim):
    grid = 3 if target == "frame" else 2
    ns = recipe(f"--latent_target={target}", f"--latent_grid={grid}")
    model, _ = ns["build_model"]()
    b = ns["get_batch"]("train", range(3))
    z = model.latents(b["latent_frames"], ns["latent_enc"])
    assert z.shape == (3, 4, dim) and model.latent_head.out_features == dim
    if target == "delta":
        assert z[:, 0].abs().max() == 0  # the change since frame 0
    if target == "target_layer":  # the target alone: its latent is what the encoder sees of the layer
        assert (b["latent_frames"].abs().sum(2) > 0).float().mean() < 0.2  # one 4 px sprite on 16 px of black
    else:
        assert b["latent_frames"] is b["frames"]


def test_target_layer_is_refused_for_real_clips(tmp_path):
    with pytest.raises(InputError, match="target_layer"):
        recipe("--task=folder", f"--data_dir={tmp_path}", "--latent_target=target_layer", "--look_weight=0")


def test_fixed_encoder_ignores_flat_images_and_sees_texture():
    enc = FovFixedEncoder(channels=8, grid=2, seed=0)
    assert torch.equal(enc.weight, FovFixedEncoder(8, 2, 0).weight)  # deterministic
    flat = torch.full((1, 3, 16, 16), 0.4)
    tex = flat.clone()
    tex[:, 0, 2:6:2, 2:6] = 1.0
    z_flat, z_tex = enc(flat), enc(tex)
    assert z_flat.shape == (1, 32)
    assert z_flat.abs().max() < 1e-5  # a flat image gives nothing (zero-mean filters, replicated borders)
    assert z_tex.abs().sum() > 10 * z_flat.abs().sum()


def test_taesd_encoder_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    enc = FovTaesdEncoder(width=8, grid=2)
    path = str(tmp_path / "taesd_encoder.safetensors")
    save_file({"encoder.layers." + k: v.contiguous() for k, v in enc.layers.state_dict().items()}, path)
    x = torch.rand(2, 3, 32, 32)
    loaded = FovTaesdEncoder(path, width=8, grid=2)
    assert torch.allclose(enc(x), loaded(x)) and loaded(x).shape == (2, 16)
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a TAESD"):
        FovTaesdEncoder(str(tmp_path / "bad.safetensors"), width=8)
    with pytest.raises(ValueError):
        fov_latent_encoder("vae.bin")


def test_folder_reader_reads_npy_clips_and_frame_folders(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 255, (10, 20, 20, 3), dtype=np.uint8))
    os.makedirs(tmp_path / "b")
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "b" / f"{i:03d}.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a": "a red thing", "b": "a blue thing"}))
    clips = fov_list_clips(str(tmp_path))
    b = fov_folder_batch(str(tmp_path), clips, [0, 1], n_frames=4, size=16)
    assert b["frames"].shape == (2, 4, 3, 16, 16) and b["captions"] == ["a red thing", "a blue thing"]
    assert 0 <= b["frames"].min() and b["frames"].max() <= 1
    with pytest.raises(ValueError, match="fewer than"):
        fov_folder_batch(str(tmp_path), clips, [1], n_frames=8, size=16)


def test_frame_folders_are_read_in_natural_order(tmp_path):
    """f1..f12 (not zero-padded): plain text order read f1, f10, f11, f12, f2, ..."""
    from PIL import Image
    os.makedirs(tmp_path / "a")
    for i in range(1, 13):  # frame i has brightness 20 i
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / "a" / f"f{i}.png")
    x = fov_load_clip(str(tmp_path), "a", 12, 8)
    assert [round(float(f.mean()) * 255 / 20) for f in x] == list(range(1, 13))
    assert [round(float(f.mean()) * 255 / 20) for f in fov_load_clip(str(tmp_path), "a", 3, 8)] == [1, 7, 12]


def test_npy_clips_read_only_the_frames_they_use_and_refuse_0_255_floats(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (13, 20, 24, 3), dtype=np.uint8)
    np.save(tmp_path / "u.npy", arr)
    # the old reader converted and resized every frame, then picked: the same numbers, frame for frame
    every = torch.nn.functional.interpolate(torch.from_numpy(arr.astype(np.float32) / 255).permute(0, 3, 1, 2),
                                            size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(fov_load_clip(str(tmp_path), "u", 5, 16), every[[0, 3, 6, 9, 12]].clamp(0, 1))
    np.save(tmp_path / "f.npy", arr.astype(np.float32) / 255)  # float in [0, 1]: read as is
    assert torch.allclose(fov_load_clip(str(tmp_path), "f", 5, 16), fov_load_clip(str(tmp_path), "u", 5, 16))
    np.save(tmp_path / "g.npy", arr.astype(np.float32))  # float 0-255 was clamped to a white clip
    for check in (lambda: fov_load_clip(str(tmp_path), "g", 5, 16), lambda: fov_check_clip(str(tmp_path), "g", 5)):
        with pytest.raises(InputError, match=r"g.npy: float32 frames must be in \[0, 1\]"):
            check()
    fov_check_clip(str(tmp_path), "f", 5)
    with pytest.raises(InputError, match="'u' has 13 frames, fewer than n_frames=14"):
        fov_check_clip(str(tmp_path), "u", 14)


def test_clip_split_holds_out_every_tenth_clip_and_never_trains_on_val():
    clips = [(f"c{i:02d}", "x") for i in range(12)]
    val, train = fov_clip_split(clips, "val"), fov_clip_split(clips, "train")
    assert [c for c, _ in val] == ["c00", "c10"] and len(train) == 10 and not set(val) & set(train)
    with pytest.raises(InputError, match="at least 2 clips"):  # one clip was both train and val
        fov_clip_split(clips[:1], "val")


def clip_folder(path, frames, captions):
    """A real clip folder: one uint8 .npy per clip, frames[i] frames each, and captions.json."""
    os.makedirs(path, exist_ok=True)
    for i, (n, c) in enumerate(zip(frames, captions)):
        np.save(path / f"c{i}.npy", np.random.default_rng(i).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8))
    (path / "captions.json").write_text(json.dumps({f"c{i}": c for i, c in enumerate(captions)}))
    return ["--task=folder", f"--data_dir={path}", "--latent_target=delta", "--look_weight=0"]


def test_a_folder_run_checks_every_clip_at_startup_and_evaluates_distinct_clips(tmp_path):
    """A short clip or a long caption failed mid-run, when a batch first drew it; n_eval beyond the held-out
    clips evaluated the same clips again."""
    args = clip_folder(tmp_path / "ok", [5, 6, 7], ["a red ball", "a dog", "two cats"])
    ns = recipe(*args, "--n_eval=8", "--n_vis=3")
    assert ns["n_eval"] == ns["config"]["n_eval"] == 1 and ns["n_vis"] == 1  # c0 is the one held-out clip
    b = ns["get_batch"]("val", range(ns["n_eval"]))
    assert b["frames"].shape == (1, 4, 3, 16, 16) and b["captions"] == ["a red ball"]
    with pytest.raises(InputError, match="'c2' has 3 frames, fewer than n_frames=4"):
        recipe(*clip_folder(tmp_path / "short", [5, 6, 3], ["a", "b", "c"]))
    with pytest.raises(InputError, match="clip 'c1': caption of .* exceeds caption_tokens=40"):
        recipe(*clip_folder(tmp_path / "long", [5, 5, 5], ["a", "word " * 40, "c"]))
    with pytest.raises(InputError, match="at least 2 clips"):
        recipe(*clip_folder(tmp_path / "one", [5], ["a"]))


@pytest.mark.parametrize("args,match", [
    (["--latent_encoder=foo"], "latent_encoder must be"),
    (["--mode_weights=(1, 0)"], "mode_weights must be 3"),
    (["--mode_weights=(0, 0, 0)"], "positive sum"),
    (["--task=foo"], "task must be one of"),
    (["--n_frames=1"], "n_frames must be >= 2"),  # was a NaN loss
    (["--latent_grid=0"], "latent_grid"),  # was a NaN loss
    (["--n_vis=5", "--n_eval=4"], "n_vis <= n_eval"),  # was an IndexError in the final eval, before its checkpoint
    (["--freeze_vit=True"], "freeze_vit=True needs vit_init"),  # a frozen random ViT
    (["--caption_tokens=3"], r"synthetic task 'track': caption of \d+ tokens exceeds caption_tokens=3"),
])
def test_bad_settings_are_one_clear_error_at_startup(args, match):
    with pytest.raises(InputError, match=match):
        recipe(*args)


def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    p = run_script("train_foveated.py", [*TINY, "--n_frames=1", f"--out_dir={tmp_path}"])
    assert p.returncode == 1 and p.stderr.strip().splitlines() == ["error: n_frames must be >= 2 (each frame "
                                                                   "predicts the next), got 1"]


def test_vit_init_of_another_shape_is_one_error_naming_both_shapes(tmp_path):
    from safetensors.torch import save_file
    other = recipe("--vit_width=16", "--vit_heads=2")["build_model"]()[0]
    save_file({"vit." + k: v.contiguous() for k, v in other.vit.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    ns = recipe(f"--vit_init={tmp_path}")
    model, _ = ns["build_model"]()
    with pytest.raises(InputError, match=r"vit_width.*shape mismatches .*\(16.*vs this ViT \(32"):
        fov_load_vit_init(model.vit, str(tmp_path))
    same = ns["build_model"]()[0]  # a ViT of this shape loads, weights and all
    save_file({"vit." + k: v.contiguous() for k, v in same.vit.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    fov_load_vit_init(model.vit, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.vit.state_dict().values(), same.vit.state_dict().values()))


def test_a_checkpoint_dir_keeps_the_configs_read_settings():
    """init_from=<dir> built the ViT from the checkpoint's meta, query_mode and temperature included, while the
    banner and results.json said the config's. They hold no weights: the config's apply (as on resume)."""
    _, meta = recipe()["build_model"]()  # deep, temperature 0.1
    ns = recipe("--query_mode=shallow", "--attn_temperature=0.5")
    model, meta2 = ns["build_model"](meta)
    assert (model.vit.config.query_mode, model.vit.config.attn_temperature) == ("shallow", 0.5)
    assert meta2["vit"]["query_mode"] == "shallow" and meta2["vit"]["n_embd"] == meta["vit"]["n_embd"]
    frames, _ = tiny_batch(ns)
    assert sum(kv is None for kv in model.encode(frames)["kv"]) == 1  # the shallow layout (2 layers)
    with pytest.raises(InputError, match="checkpoint's ViT takes 16 px frames"):
        recipe("--image_size=32")["build_model"](meta)


def test_hollow_coarse_path_warnings_on_hand_made_metrics():
    good = dict(loss_coarse=0.22, loss_mean=1.13, cos_z_fine_coarse=0.6, entropy_coarse=1.45)
    assert fov_hollow_warnings(good, 64) == []
    at_mean = fov_hollow_warnings(dict(good, loss_coarse=1.10), 64)  # coarse at the mean: a hollow ratio
    assert len(at_mean) == 1 and "not clearly below the mean" in at_mean[0]
    same = fov_hollow_warnings(dict(good, cos_z_fine_coarse=0.97), 64)
    assert len(same) == 1 and "nearly the same" in same[0]
    flat = fov_hollow_warnings(dict(good, entropy_coarse=0.99 * math.log(64)), 64)
    assert len(flat) == 1 and "near uniform" in flat[0]

# -- end to end


def run_foveated(*args):
    p = run_script("train_foveated.py", [*TINY, "--batch_size=4", "--n_eval=8", "--eval_batch=8", "--n_caption_eval=2",
                                         "--caption_tokens=40", "--n_vis=2", "--log_interval=1", *args],
                   env=dict(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def step_losses(out):
    return {line.split()[1]: line.split("|")[1] for line in out.splitlines() if line.startswith("step ")}


def test_end_to_end_writes_results_png_checkpoint_and_resumes_exactly(tmp_path):
    full = run_foveated("--max_steps=6", "--eval_interval=100", "--n_vis=0", f"--out_dir={tmp_path / 'full'}")
    assert (tmp_path / "full" / "results.json").exists() and not list((tmp_path / "full").glob("*.png"))  # n_vis=0
    out = run_foveated("--max_steps=4", "--eval_interval=4", f"--out_dir={tmp_path / 'run'}")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["recipe"] == "foveated" and res["step"] == 4 and res["split"] == "val"
    for k in ("ratio", "loss_fine", "loss_coarse", "entropy_fine", "entropy_coarse", "max_att_fine",
              "max_att_coarse", "cos_z_fine_coarse", "target_att_fine", "caption_exact", "loss_copy", "loss_mean"):
        assert k in res["metrics"], k
    assert res["metrics"]["ratio"] == pytest.approx(res["metrics"]["loss_coarse"] / res["metrics"]["loss_fine"])
    assert len(res["per_frame"]["fine"]) == 3  # 4 frames -> 3 next-frame predictions
    assert os.path.exists(tmp_path / "run" / "attention_000004.png") and res["png"] == "attention_000004.png"
    assert os.path.exists(tmp_path / "run" / "ckpt" / "model.safetensors")
    # the eval prints two lines: the targets, then a few diagnostics; the long tail is in results.json only
    lines = out[out.index("eval step 4 |"):].splitlines()
    assert "ratio" in lines[0] and "entropy_gap" in lines[0] and "loss_coarse" in lines[1]
    assert lines[2].startswith("done:") and "per-frame" not in out and "cos_z_fine_coarse" not in out
    assert set(res["caption_example"]) == {"generated", "truth"}
    evals = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4] and evals[0]["metrics"] == res["metrics"]
    assert len(res["per_frame"]["read_coarse"]) == 4  # what each read holds of its own frame, frames 0..3
    assert np.mean(res["per_frame"]["copy"]) == pytest.approx(res["metrics"]["loss_copy"], rel=1e-4)
    for path in ("fine", "coarse"):  # the per-frame read losses average to the eval's read loss
        assert np.mean(res["per_frame"][f"read_{path}"]) == pytest.approx(res["metrics"][f"loss_read_{path}"], rel=1e-4)
    resumed = run_foveated("--max_steps=6", "--eval_interval=100", "--init_from=resume", "--n_layer=2",
                           f"--out_dir={tmp_path / 'run'}")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["step"] == 6
    # the checkpoint's shape wins, is printed, and is what results.json records
    assert "from checkpoint: n_layer=1 (config said 2)" in resumed and res["config"]["n_layer"] == 1
    assert step_losses(resumed) == {k: v for k, v in step_losses(full).items() if k in ("5/6", "6/6")}  # exact
    again = run_foveated("--max_steps=6", "--eval_interval=100", "--init_from=resume", f"--out_dir={tmp_path / 'run'}")
    assert "done: 0 steps" in again  # resuming a finished run trains nothing and says so
    ev = run_foveated("--eval_only=True", f"--init_from={tmp_path / 'run' / 'ckpt'}", "--query_mode=shallow",
                      f"--out_dir={tmp_path / 'ev'}")
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "eval step 6 | ratio" in ev and res["step"] == 6 and "step 1/" not in ev  # evaluated, never trained
    # the config's read mode, not the checkpoint's: it holds no weights
    assert "shallow queries" in ev and res["config"]["query_mode"] == "shallow"
    assert res["metrics"] != json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]


def test_a_resume_continues_the_time_budget_and_its_lr_clock(tmp_path):
    """A run stopped on max_train_seconds, resumed: the budget and the LR schedule go on from the seconds of
    training already used (restarted at 0, the LR would jump back up), and train_seconds is the total."""
    run_foveated("--max_steps=4", "--eval_interval=100", "--n_vis=0", f"--out_dir={tmp_path}")
    path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(path.read_text())
    assert meta["step"] == 4 and meta["train_seconds"] > 0
    meta.update(train_seconds=2400.0)  # as if 2400 s of a 2000 s budget had been used
    path.write_text(json.dumps(meta))
    out = run_foveated("--max_steps=6", "--eval_interval=100", "--n_vis=0", "--init_from=resume",
                       "--max_train_seconds=2000", "--warmup_steps=0", f"--out_dir={tmp_path}")
    first = [line for line in out.splitlines() if line.startswith("step 5/6")]
    assert len(first) == 1 and "| lr 2.0e-04 |" in first[0]  # the floor: the schedule is past its end
    assert "stopping at step 5/6" in out  # the budget was already spent: one step, then the final eval
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["step"] == 5 and res["train_seconds"] >= 2400
    assert json.loads(path.read_text())["train_seconds"] >= 2400
