"""data.py foundations: tokenizer, image I/O, seeded batching with DDP sharding, results.json."""
import json

import numpy as np
import pytest
import torch

import data


# -----------------------------------------------------------------------------
# tokenizer


def test_special_tokens_by_id_only():
    tok = data.Tokenizer(specials=("[SEG]", "<vp>"))
    assert tok.n_base == 256
    assert [tok[n] for n in ("<|bos|>", "<|eos|>", "<|pad|>", "<|image|>", "[SEG]", "<vp>")] == list(range(256, 262))
    assert tok.vocab_size == 262
    # text that spells a special token is just text: bytes, never the special id
    for name in ("<|image|>", "[SEG]", "<|eos|>"):
        ids = tok.encode(f"look {name} here")
        assert all(i < 256 for i in ids) and tok[name] not in ids
        assert tok.decode(ids) == f"look {name} here"
    # repeated specials are not duplicated
    assert data.Tokenizer(specials=("<|image|>",)).vocab_size == 260


def test_decode_round_trip_unicode_and_special_skipping():
    tok = data.Tokenizer()
    text = "héllo wörld ☃ 日本語 🙂\n\ttabs  and  spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    seq = [tok["<|bos|>"]] + ids + [tok["<|image|>"], tok["<|eos|>"]]
    assert tok.decode(seq) == text
    assert tok.decode(seq, skip_special=False) == "<|bos|>" + text + "<|image|><|eos|>"
    assert tok.decode(torch.tensor(ids)) == text  # tensors of ids work too
    assert tok.decode([0xE6]) == "\ufffd"  # a cut multi-byte char decodes with a replacement, no exception


def test_named_encoding_unavailable_offline_is_a_clear_error(monkeypatch):
    import tiktoken
    import model

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(model.InputError, match="not available offline"):
        data.Tokenizer(base="gpt2")


# -----------------------------------------------------------------------------
# images


def test_save_png_load_image_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    path = str(tmp_path / "sub" / "dir" / "img.png")
    assert data.save_png(x, path) == path
    assert not (tmp_path / "sub" / "dir" / "img.png.tmp").exists()
    y = data.load_image(path)
    assert y.shape == (3, 12, 20) and y.dtype == torch.float32
    assert torch.equal((y * 255).round().byte(), torch.from_numpy(arr).permute(2, 0, 1))
    # arrays, grayscale and PIL images are accepted too
    data.save_png(arr, str(tmp_path / "a.png"))
    assert torch.equal(data.load_image(str(tmp_path / "a.png")), y)
    data.save_png(torch.rand(5, 6), str(tmp_path / "g.png"))
    assert data.load_image(str(tmp_path / "g.png")).shape == (3, 5, 6)
    assert data.load_image(path, size=8).shape == (3, 8, 8)
    assert data.load_image(path, size=(10, 4)).shape == (3, 4, 10)  # (W, H)
    with pytest.raises(FileNotFoundError, match="image not found"):
        data.load_image(str(tmp_path / "missing.png"))


def test_normalize_and_grid():
    x = torch.ones(3, 4, 4)
    assert torch.allclose(data.normalize(x), torch.ones(3, 4, 4))
    assert torch.allclose(data.normalize(torch.zeros(3, 2, 2)), -torch.ones(3, 2, 2))
    grid = data.image_grid([torch.rand(3, 4, 5) for _ in range(5)], cols=2)
    assert grid.size == (10, 12)


def test_oriented_edges_measure_each_orientation():
    n = 12
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    vertical = (xs >= 6).float()     # a step in x: only the x channel and (equally) both diagonals respond
    diagonal = (xs > ys).float()     # brighter toward the top right: the anti-diagonal filter, not the other
    for img, expected in ((vertical, [1.0, 0.0, 0.75, 0.75]), (diagonal, None)):
        e = data.oriented_edges(img.expand(1, 3, n, n))
        assert e.shape == (1, 4, n, n)
        peak = e[0, :, 1:-1, 1:-1].flatten(1).amax(1)  # the border replicates, which bends a diagonal
        if expected is not None:
            assert torch.allclose(peak, torch.tensor(expected))
    assert peak[2] > 0.9 and peak[3] < 1e-6 and torch.isclose(peak[0], peak[1])
    # replicate padding: a flat image has no edges, not even at its border
    assert float(data.oriented_edges(torch.full((2, 3, 8, 8), -0.8)).abs().max()) < 1e-6  # zero padding: 0.8
    # the max over colour: a step in the blue channel alone is an edge as strong as one in all three
    blue = torch.zeros(1, 3, n, n)
    blue[0, 2] = vertical
    assert torch.equal(data.oriented_edges(blue), data.oriented_edges(vertical.expand(1, 3, n, n)))


# -----------------------------------------------------------------------------
# seeded batching


def draw(seed, split, index):
    return data.sample_rng(seed, split, index).integers(0, 2**62, 4).tolist()


def test_sample_rng_determinism_and_disjoint_splits():
    assert draw(1, "train", 5) == draw(1, "train", 5)
    assert draw(1, "train", 5) != draw(1, "train", 6)
    assert draw(1, "train", 5) != draw(2, "train", 5)
    train = {tuple(draw(0, "train", i)) for i in range(300)}
    val = {tuple(draw(0, "val", i)) for i in range(300)}
    assert len(train) == 300 and len(val) == 300 and not train & val
    with pytest.raises(ValueError, match="unknown split"):
        data.sample_rng(0, "valid", 0)


def _noisy_batch(step):
    # a function of the step alone, drawing random numbers as the synthetic generators do (seeded per step)
    rng = np.random.default_rng(step)
    return dict(x=torch.from_numpy(rng.normal(size=(2, 3))), step=torch.tensor(step))


def test_step_batches_in_workers_equal_the_main_process():
    inline = list(data.step_batches(_noisy_batch, 3, 9))
    forked = list(data.step_batches(_noisy_batch, 3, 9, num_workers=2))
    assert [int(b["step"]) for b in forked] == list(range(3, 9))  # in order, from the resume step
    for a, b in zip(inline, forked):
        assert torch.equal(a["x"], b["x"])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_batch_indices_union_over_ranks_equals_one_process_batch(world):
    B = 3
    for step in range(4):
        per_rank = [data.batch_indices(step, B, rank, world) for rank in range(world)]
        assert all(len(r) == B for r in per_rank)
        union = sorted(i for r in per_rank for i in r)
        assert union == data.batch_indices(step, B * world)  # one process, global batch
        assert len(set(union)) == B * world
    # consecutive steps never reuse an index
    seen = [i for s in range(5) for r in range(world) for i in data.batch_indices(s, B, r, world)]
    assert len(seen) == len(set(seen)) == 5 * B * world


def test_epoch_order():
    order = data.epoch_order(10, seed=1, epoch=0)
    assert sorted(order) == list(range(10)) and order == data.epoch_order(10, seed=1, epoch=0)
    assert order != data.epoch_order(10, seed=1, epoch=1) and order != data.epoch_order(10, seed=2, epoch=0)


# -----------------------------------------------------------------------------
# results.json


def test_write_results_shape_and_met(tmp_path):
    res = data.write_results(str(tmp_path / "out"), "lanelm", "val", 500, {"acc": 0.962, "fp": np.float32(0.03)},
                             {"acc": (">=", 0.95), "fp": ("<=", 0.05)}, step=2000, train_seconds=541.2,
                             device="cpu", dtype="float32", params=3412345, config={"lr": 3e-4})
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in ("recipe", "split", "n_eval", "metrics", "targets", "met", "step", "train_seconds", "device",
                "dtype", "params", "config", "git"):
        assert key in on_disk, key
    assert on_disk["recipe"] == "lanelm" and on_disk["split"] == "val" and on_disk["n_eval"] == 500
    assert on_disk["targets"] == {"acc": [">=", 0.95], "fp": ["<=", 0.05]}
    assert on_disk["met"] is True and isinstance(on_disk["metrics"]["fp"], float)
    assert not (tmp_path / "out" / "results.json.tmp").exists()

    missed = data.write_results(str(tmp_path), "x", "val", 1, {"acc": 0.9}, {"acc": (">=", 0.95)})
    assert missed["met"] is False
    absent = data.write_results(str(tmp_path), "x", "val", 1, {"other": 1.0}, {"acc": (">=", 0.95)})
    assert absent["met"] is False  # a target metric that was not measured is not met
    for op, value, thr, ok in [(">", 1, 1, False), ("<", 0, 1, True), ("<=", 1, 1, True), (">=", 0.9, 1, False)]:
        assert data.target_met(value, op, thr) is ok
    line = data.format_metrics({"acc": 0.962, "f1": 0.5}, {"acc": (">=", 0.95), "f1": (">=", 0.9)})
    assert "acc 0.962 (>= 0.95 ok)" in line and "f1 0.5 (>= 0.9 MISS)" in line
