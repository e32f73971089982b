"""OCR recipe: DeepEncoder layout, gradients, generation, metrics (worked examples), data, end to end."""
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import Tokenizer  # noqa: E402
from data_ocr import (ocr_pairwise_cosine, ocr_shared_spread, OCR_GLYPH_CLASSES, OCR_TOKEN_SLOTS, fox_word_metrics, ocr_glyph_labels, ocr_slot_labels, ocr_edit_distance, ocr_metrics, ocr_ned, ocr_omnidoc_normalize,  # noqa: E402
                      ocr_probe_images, ocr_read_fox, ocr_read_jsonl, ocr_read_omnidocbench, ocr_synthetic_sample,
                      ocr_word_split)
from data import save_png  # noqa: E402
from model import GPT, GPTConfig, InputError  # noqa: E402
from inprocess import run_script  # noqa: E402


@pytest.fixture(scope="module")
def ocr():
    """data_ocr.py, which holds the OCR model (DeepEncoder, OCRModel) and its builders."""
    import data_ocr
    return data_ocr


def tiny_encoder(ocr, out_dim=32, glyph_classes=0, token_slots=0):
    return ocr.DeepEncoder(ocr.EncoderConfig(image_size=32, sam_patch=4, sam_dim=16, sam_layers=2, sam_heads=2,
                                             sam_window=4, sam_global=(1,), neck_dim=8, clip_layers=1,
                                             clip_heads=2, out_dim=out_dim, glyph_classes=glyph_classes,
                                             token_slots=token_slots))


def tiny_model(ocr, tok, glyph_classes=0, token_slots=0):
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                        sequence_len=64, image_token_id=tok["<|image|>"]))
    return ocr.OCRModel(tiny_encoder(ocr, glyph_classes=glyph_classes, token_slots=token_slots), gpt)

# -----------------------------------------------------------------------------
# DeepEncoder


def test_vision_token_count_deepseek_base(ocr):
    # DeepSeek-OCR base mode: 1024 px, patch 16, two stride-2 convs -> q = 16 -> (16+1)*16+1
    assert ocr.vision_token_count(1024, 16, 4) == 273
    assert ocr.EncoderConfig(image_size=1024, sam_patch=16).q == 16
    assert ocr.vision_token_count(64, 4) == 21  # the CPU default: 4x4 + 4 newlines + 1 separator


def test_encoder_layout_shape_and_newlines(ocr):
    torch.manual_seed(0)
    enc = tiny_encoder(ocr)
    x = torch.randn(3, 3, 32, 32)
    out = enc(x)
    q = enc.config.q
    assert q == 2 and out.shape == (3, ocr.vision_token_count(32, 4), 32) == (3, 7, 32)
    # a newline after each of the q rows, the separator last
    for r in range(q):
        assert torch.equal(out[:, r * (q + 1) + q], enc.image_newline.expand(3, -1))
    assert torch.equal(out[:, -1], enc.view_separator.expand(3, -1))
    feats = enc.features(x)
    assert feats["sam"].shape == (3, q * q, 32) and feats["clip"].shape == (3, q * q, 32)
    assert not hasattr(enc.clip, "patch")  # CLIP reads SAM features: no patch embedding to leave unused


def test_batch_center_removes_the_image_independent_part(ocr):
    bc = ocr.BatchCenter(3, 4, momentum=0.5)
    shared = torch.randn(1, 3, 4) * 100  # what every image has in common (the collapse direction)
    x = shared + torch.randn(8, 3, 4)
    y = bc(x)
    assert torch.allclose(y.mean(0), torch.zeros(3, 4), atol=1e-4)
    assert torch.allclose(y, x - x.mean(0))
    assert torch.allclose(bc.running_mean, 0.5 * x.mean(0))  # lerp from zeros with momentum 0.5
    bc.eval()
    assert torch.allclose(bc(x), x - bc.running_mean)  # eval: the running mean, batch-size independent
    bc.train()  # one image (no DDP): nothing to centre against, the running mean is used (setup refuses batch_size=1)
    assert torch.allclose(bc(x[:1]), x[:1] - bc.running_mean)


def test_batch_size_one_with_centring_is_a_clear_error(tmp_path):
    r = run_script("train_ocr.py", TINY + ["--batch_size=1", "--max_steps=1", "--out_dir=" + str(tmp_path)])
    assert r.returncode != 0 and "global batch of >= 2" in r.stderr and "Traceback" not in r.stderr


def test_encoder_flops_count_each_module_at_its_positions(ocr):
    enc = tiny_encoder(ocr)  # 32 px, patch 4: g = 8 (SAM, neck), net_2 at 4x4, net_3 / CLIP / projector at q x q = 2x2
    s = enc.sam
    w = lambda m: sum(p.numel() for n, p in m.named_parameters() if p.dim() >= 2 and n != "pos")
    attn = 2 * 16 * 16 * 64 + 2 * 64 * 16 * 64  # block 0 windows of 4x4 keys, block 1 global (8x8), width 16, 64 queries
    clip_attn = 2 * 4 * 32 * 4  # 2x2 keys, width 32, 2x2 queries, one layer
    want = 6 * (64 * (w(s.patch) + w(s.neck) + sum(w(b) for b in s.blocks)) + 16 * w(s.net_2)
                + 4 * (w(s.net_3) + w(enc.clip) + w(enc.projector)) + attn + clip_attn)
    assert ocr.encoder_flops(enc) == want
    assert w(enc.clip) < sum(p.numel() for p in enc.clip.parameters())  # the position embedding is left out
    s.requires_grad_(False)  # stage 2: SAM runs forward only, a third of the cost
    assert ocr.encoder_flops(enc) == want - 4 * (64 * (w(s.patch) + w(s.neck) + sum(w(b) for b in s.blocks))
                                                 + 16 * w(s.net_2) + 4 * w(s.net_3) + attn)


def test_shared_spread_separates_the_common_part():
    x = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]])  # mean over images [2, 4] (RMS sqrt(10)); deviations +-1
    shared, spread = ocr_shared_spread(x)
    assert shared == pytest.approx(10 ** 0.5) and spread == pytest.approx(1.0)


def test_window_partition_round_trip_with_padding(ocr):
    x = torch.randn(2, 10, 10, 6)
    w, padded = ocr.window_partition(x, 4)
    assert w.shape == (2 * 9, 4, 4, 6) and padded == (12, 12)
    assert torch.equal(ocr.window_unpartition(w, 4, padded, (10, 10)), x)


def batch(tok, ocr, texts, n_vision):
    seqs = [[tok["<|bos|>"]] + [tok["<|image|>"]] * n_vision + tok.encode("\nFree OCR.") + tok.encode(t)
            + [tok["<|eos|>"]] for t in texts]
    T = max(map(len, seqs)) - 1
    idx = torch.full((len(seqs), T), tok["<|pad|>"])
    tgt = torch.full((len(seqs), T), -1)
    for i, s in enumerate(seqs):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        tgt[i, n_vision + 10:len(s) - 1] = torch.tensor(s[n_vision + 11:])
    return idx, tgt


def test_every_trainable_param_gets_a_gradient_on_a_vision_batch(ocr):
    # DDP refuses a parameter without a gradient (CLIP's patch embedding once was one)
    torch.manual_seed(0)
    tok = Tokenizer()
    model = tiny_model(ocr, tok)
    idx, tgt = batch(tok, ocr, ["ab 12", "xyz"], 7)
    images = torch.randn(2, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # one step first: zero-initialised residual projections block gradients at init
        opt.zero_grad()
        _, loss = model(idx, tgt, images)
        loss.backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []


def test_aux_losses_train_every_param_and_ignore_unlabelled_cells(ocr):
    # the glyph (SAM, per patch) and slot (projected tokens, per slot) cross-entropies of stage 1
    torch.manual_seed(0)
    tok = Tokenizer()
    model = tiny_model(ocr, tok, glyph_classes=OCR_GLYPH_CLASSES, token_slots=OCR_TOKEN_SLOTS)
    idx, tgt = batch(tok, ocr, ["ab 12", "xyz"], 7)
    images = torch.randn(2, 3, 32, 32)
    aux = dict(glyphs=torch.randint(0, OCR_GLYPH_CLASSES, (2, 8, 8)),
               slots=torch.randint(0, OCR_GLYPH_CLASSES, (2, 2, 2, OCR_TOKEN_SLOTS)))
    aux["glyphs"][0, :2] = -1  # unlabelled cells
    aux["slots"][1, 0] = -1
    _, text_loss, sums = model(idx, tgt, images, aux=aux)
    _, logits = model.encoder(images, glyphs=True)
    assert logits["glyphs"].shape == (2, 8, 8, OCR_GLYPH_CLASSES)
    assert logits["slots"].shape == (2, 2, 2, OCR_TOKEN_SLOTS, OCR_GLYPH_CLASSES)
    for k in ("glyphs", "slots"):
        keep = aux[k] != -1
        ref = torch.nn.functional.cross_entropy(logits[k][keep], aux[k][keep], reduction="sum")
        assert sums[k].item() == pytest.approx(ref.item(), rel=1e-5), k
    _, plain_loss = model(idx, tgt, images)  # without labels: the plain path, the same text loss
    assert torch.allclose(text_loss, plain_loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _, loss, sums = model(idx, tgt, images, aux=aux)
        (loss + sum(sums.values()) / 100).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []


def test_stage2_freezes_sam_only(ocr):
    tok = Tokenizer()
    model = tiny_model(ocr, tok)
    model.encoder.sam.requires_grad_(False)  # what stage=2 does
    idx, tgt = batch(tok, ocr, ["ab"], 7)
    _, loss = model(idx, tgt, torch.randn(1, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.sam.parameters())
    assert all(p.grad is not None for p in model.encoder.clip.parameters())


def test_text_only_batch_leaves_the_encoder_unused(ocr):
    # why DDP needs find_unused_parameters exactly when text_ratio > 0
    tok = Tokenizer()
    model = tiny_model(ocr, tok)
    idx = torch.tensor([[tok["<|bos|>"]] + tok.encode("plain text")])
    _, loss = model(idx, torch.roll(idx, -1, 1), None)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.gpt.lm_head.weight.grad is not None


def test_activation_checkpointing_gives_the_same_gradients(ocr):
    """set_checkpointing reaches SAM's windowed blocks, CLIP's and the GPT's: the same loss and gradients."""
    from model import set_checkpointing
    torch.manual_seed(0)
    tok = Tokenizer()
    model = tiny_model(ocr, tok)
    idx, tgt = batch(tok, ocr, ["ab 12", "xyz"], 7)
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for on in (False, True):
        model.zero_grad()
        set_checkpointing(model, on)
        assert model.encoder.sam.checkpointing == model.encoder.clip.checkpointing == model.gpt.checkpointing == on
        _, loss = model(idx, tgt, images)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, g0), (ckpt, g1) = grads
    assert plain == ckpt and g0.keys() == g1.keys() and any(n.startswith("encoder.sam.blocks") for n in g0)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


def test_generation_cache_equals_recompute_and_never_emits_image_token(ocr):
    torch.manual_seed(0)
    tok = Tokenizer()
    model = tiny_model(ocr, tok).eval()
    with torch.no_grad():  # make the image token the model's favourite: it must still never be generated
        model.gpt.lm_head.weight[tok["<|image|>"]] = model.gpt.lm_head.weight.abs().max() * 50
    vision = model.encoder(torch.randn(3, 3, 32, 32))
    prompt = [tok["<|bos|>"]] + [tok["<|image|>"]] * 7 + tok.encode("\nFree OCR.")
    idx = torch.tensor([prompt] * 3)
    a = model.gpt.generate(idx, 12, vision_embeds=vision, use_cache=True)
    b = model.gpt.generate(idx, 12, vision_embeds=vision, use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, 12)
    assert not (a == tok["<|image|>"]).any()


def test_mean_pairwise_cosine():
    assert ocr_pairwise_cosine(torch.ones(4, 8)) == pytest.approx(1.0)
    assert ocr_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    # pairs: (a,b)=0, (a,c)=1/sqrt2, (b,c)=1/sqrt2 -> mean sqrt2/3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert ocr_pairwise_cosine(x) == pytest.approx(2 ** 0.5 / 3, abs=1e-6)

# -----------------------------------------------------------------------------
# metrics: worked examples


def reference_edit_distance(a, b):
    """The textbook O(len(a) * len(b)) DP the bit-parallel ocr_edit_distance must equal."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_equals_the_dp_on_random_strings():
    import random
    rng = random.Random(0)
    for _ in range(3000):  # small alphabets force repeats; unicode and newlines are characters like any other
        alphabet = rng.choice(["ab", "abc", "abcdefgh", "a\u00e9\u6f22 \n"])
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert ocr_edit_distance(a, b) == ocr_edit_distance(b, a) == reference_edit_distance(a, b), (a, b)
    for n in (63, 64, 65, 200):  # around machine-word sizes, and longer
        a = "".join(rng.choice("abcd ") for _ in range(n))
        b = "".join(rng.choice("abcd ") for _ in range(n + rng.randint(-20, 20)))
        assert ocr_edit_distance(a, b) == reference_edit_distance(a, b)


def test_edit_distance_and_ned():
    assert ocr_edit_distance("kitten", "sitting") == 3
    assert ocr_edit_distance("", "abc") == 3 and ocr_edit_distance("abc", "abc") == 0
    assert ocr_ned("kitten", "sitting") == pytest.approx(3 / 7)  # / max(len)
    assert ocr_ned("", "") == 0.0 and ocr_ned("abc", "") == 1.0


def test_omnidocbench_normalisation():
    assert ocr_omnidoc_normalize("a b,\nc.") == "abc"
    assert ocr_ned("a b, c", "abc") == pytest.approx(3 / 6)
    assert ocr_ned("a b, c", "abc", normalize="omnidocbench") == 0.0
    with pytest.raises(ValueError):
        ocr_ned("a", "b", normalize="bogus")
    # clean_string deletes backslash-t/n and "/t", "/n" before its character filter
    assert ocr_omnidoc_normalize("and/not") == "andot" and ocr_omnidoc_normalize("a\\tb/tc") == "abc"
    assert ocr_ned("line1\\nline2", "line1line2", normalize="omnidocbench") == 0.0
    assert ocr_omnidoc_normalize("a/\nt") == "a"  # in order: the newline goes, which joins a "/t", which goes
    assert ocr_omnidoc_normalize("\u6f22\u5b57 \u00e9_1") == "\u6f22\u5b57\u00e9_1"  # CJK, letters, _ kept


def test_omnidocbench_empty_sides():
    # a side that cleans to empty is scored raw; both raw sides empty: NaN, left out of the page mean
    assert ocr_ned("...", "", normalize="omnidocbench") == 1.0
    assert ocr_ned("!!", "??", normalize="omnidocbench") == 1.0  # raw "!!" vs raw "??"
    assert ocr_ned("ab", "--", normalize="omnidocbench") == 1.0  # "ab" vs raw "--"
    assert math.isnan(ocr_ned("", "", normalize="omnidocbench"))
    m = ocr_metrics(["", "abc", "ab"], ["", "abc", "xy"])
    assert m["ned_omnidoc"] == pytest.approx(0.5) and m["ned"] == pytest.approx(1 / 3)  # 2 pages against 3
    assert math.isnan(ocr_metrics([""], [""])["ned_omnidoc"])


def test_fox_precision_is_the_swapped_official_score():
    # gt words {the, cat, dog}, pred words {the, cat}: 2 of 3 gt words found, every pred word correct
    m = fox_word_metrics("the cat", "the cat the dog")
    assert m["fox_precision"] == pytest.approx(2 / 3)  # official Fox "precision" = |G & P| / |G|
    assert m["word_precision"] == pytest.approx(1.0)   # textbook precision |G & P| / |P|
    assert m["word_recall"] == pytest.approx(2 / 3)
    assert m["word_f1"] == pytest.approx(0.8)
    # a hallucinated extra word lowers textbook precision but not fox_precision
    m = fox_word_metrics("the cat dog zebra", "the cat dog")
    assert m["fox_precision"] == 1.0 and m["word_precision"] == pytest.approx(0.75)


def test_fox_splits_cjk_with_jieba():
    # official: jieba.lcut on both sides when either holds a character in [\u4e00-\u9fa5], spaces and punctuation
    # included as words; whitespace split otherwise
    jieba = pytest.importorskip("jieba")
    gt, pred = "\u6211\u7231\u5317\u4eac", "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8"
    g, p = set(jieba.lcut(gt)), set(jieba.lcut(pred))
    m = fox_word_metrics(pred, gt)
    assert len(g) > 1 and m["fox_precision"] == pytest.approx(len(g & p) / len(g))
    assert m["word_precision"] == pytest.approx(len(g & p) / len(p))
    # one stray CJK character switches an English page to jieba: "cat," is then "cat" and ","
    m = fox_word_metrics("the cat, \u732b", "the cat")
    assert m["fox_precision"] == 1.0 and m["word_precision"] == pytest.approx(3 / 5)  # {the, " ", cat, ",", 猫}
    assert fox_word_metrics("the cat,", "the cat")["fox_precision"] == pytest.approx(1 / 2)  # "cat," != "cat"


def test_fox_needs_jieba_only_for_cjk(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # as if not installed
    assert fox_word_metrics("the cat", "the cat")["fox_precision"] == 1.0  # English: never imported
    with pytest.raises(InputError, match="needs the jieba package"):
        fox_word_metrics("\u732b", "the cat")


def test_ocr_metrics_average_per_page():
    m = ocr_metrics(["abc", "xx"], ["abc", "xy"])
    assert m["ned"] == pytest.approx((0 + 0.5) / 2)
    assert m["exact_match"] == 0.5 and m["fox_precision"] == 0.5
    with pytest.raises(ValueError):
        ocr_metrics([], [])

# -----------------------------------------------------------------------------
# data


@pytest.mark.parametrize("layout", [dict(), dict(pitch=7, line_gap=16)])  # proportional; typewriter grid
def test_synthetic_is_deterministic_and_heldout_words_are_unseen(layout):
    a, b = ocr_synthetic_sample(0, "val", 3, **layout), ocr_synthetic_sample(0, "val", 3, **layout)
    assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])
    assert a["image"].shape == (3, 64, 64) and 0 <= a["image"].min() and a["image"].max() <= 1
    for i in range(30):  # every word (a label's trailing ':' aside) belongs to its split's stream
        val, train = ocr_synthetic_sample(0, "val", i, **layout), ocr_synthetic_sample(0, "train", i, **layout)
        assert all(ocr_word_split(w.rstrip(":")) == "val" for w in val["text"].split())
        assert all(ocr_word_split(w.rstrip(":")) == "train" for w in train["text"].split())
        assert val["image"].std() > 0.02  # the text was drawn


def test_glyph_labels_worked_example():
    # 32 px page, 4 px patches (centres 2, 6, ..., 30), cells 6 px wide from x0 = 2, lines 12 px apart from
    # y0 = 1, glyphs 8 + 2 px tall: line 0 covers patch rows 0-2, line 1 (top 13) rows 3-5
    g = ocr_glyph_labels(["ab", "c d\u00e9"], 32, 4, 2, 1, 12, 8, 6)
    code = lambda ch: ord(ch) - 32
    expect = torch.zeros(8, 8, dtype=torch.long)
    expect[0:3, 0:2], expect[0:3, 2] = code("a"), code("b")        # 'a': x in [2, 8); 'b': [8, 14)
    expect[3:6, 0:2], expect[3:6, 3:5] = code("c"), code("d")      # ' ' at [8, 14) stays 0; 'd': [14, 20)
    expect[3:6, 5] = -1                                            # a non-ASCII character: ignored
    assert torch.equal(torch.from_numpy(g), expect)


def test_slot_labels_worked_example():
    # 32 px page, 16 px tokens (q = 2), 3 slots of 5.33 px; pitch 7 from x0 = 2: character centres 5.5, 12.5,
    # 19.5, 26.5 -> (token col, slot) (0, 1), (0, 2), (1, 0), (1, 1). Line 0's centre y = 1 + 5 = 6 -> row 0;
    # line 1's 6 + 16 = 22 -> row 1
    s = ocr_slot_labels(["ab c", "xy"], 32, 16, 3, 2, 1, 16, 8, 7)
    code = lambda ch: ord(ch) - 32
    assert s.tolist() == [[[0, code("a"), code("b")], [0, code("c"), 0]],
                          [[0, code("x"), code("y")], [0, 0, 0]]]
    # two characters in one slot (pitch 3 < 16 / 3): the slot is ignored, not silently overwritten
    assert ocr_slot_labels(["ab"], 32, 16, 3, 0, 1, 16, 8, 3)[0, 0, 0] == -1


def test_synthetic_glyphs_are_the_pages_characters():
    for i in range(20):
        s = ocr_synthetic_sample(0, "train", i, 64, (10, 11), 3, pitch=7, line_gap=16, glyph_patch=4)
        g = s["glyphs"]
        assert g.shape == (16, 16)
        shown = {chr(c + 32) for c in g[g > 0].tolist()}
        assert shown and shown <= set(s["text"].replace(" ", "").replace("\n", ""))
        lines_hit = [r for r in range(16) if (g[r] > 0).any()]
        assert len(lines_hit) >= 2 * len(s["text"].split("\n"))  # each line spans >= 2 patch rows
        slots = s["slots"]
        assert slots.shape == (4, 4, 3) and (slots >= 0).all()  # pitch 7 > 16 / 3: never two in one slot
        assert sorted(slots[slots > 0].tolist()) == sorted(ord(c) - 32 for c in s["text"] if c not in " \n")
    assert "glyphs" not in ocr_synthetic_sample(0, "train", 0, 64, (10, 11), 3, pitch=0, glyph_patch=4)


def test_synthetic_text_is_drawn():
    s = ocr_synthetic_sample(1, "train", 0, noise=0.0)
    assert s["text"].strip() and s["image"].std() > 0.05  # ink on paper, not a blank page
    assert ocr_synthetic_sample(1, "train", 1)["text"] != s["text"]


def test_probe_set():
    names, x = ocr_probe_images(64)
    assert names == ["noise", "white", "black", "text"] and x.shape == (4, 3, 64, 64)
    assert x[1].min() == 1 and x[2].max() == 0


def blank_png(path, size=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_png(torch.ones(3, size, size), str(path))


def fox_entry(image, text):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nOCR"}, {"from": "gpt", "value": text}]}


def test_readers(tmp_path):
    for name in ("p.png", "q.png", "images/p1.jpg"):
        blank_png(tmp_path / name)
    (tmp_path / "a.jsonl").write_text('{"image": "p.png", "text": "hi there"}\n\n{"image": "q.png", "text": "x"}\n')
    items = ocr_read_jsonl(str(tmp_path / "a.jsonl"))
    assert [i["text"] for i in items] == ["hi there", "x"] and items[0]["image"] == str(tmp_path / "p.png")
    (tmp_path / "fox.json").write_text(json.dumps([fox_entry("p.png", "page text")]))
    assert ocr_read_fox(str(tmp_path / "fox.json"))[0]["text"] == "page text"
    omni = [{"page_info": {"image_path": "p1.jpg"}, "layout_dets": [
        {"category_type": "text_block", "order": 2, "text": "second"},
        {"category_type": "title", "order": 1, "text": "first"},
        {"category_type": "text_block", "order": 3, "text": "skip", "ignore": True},
        {"category_type": "figure", "order": 4}]}]
    (tmp_path / "omni.json").write_text(json.dumps(omni))
    page = ocr_read_omnidocbench(str(tmp_path / "omni.json"))[0]
    assert page["text"] == "first\n\nsecond" and page["image"].endswith(os.path.join("images", "p1.jpg"))


def test_omnidocbench_reads_the_benchmarks_text_categories(tmp_path):
    # the category names of OmniDocBench's end-to-end text evaluation, caption and algorithm kinds included
    cats = ["text_block", "title", "code_txt", "code_txt_caption", "reference", "equation_caption", "figure_caption",
            "figure_footnote", "table_caption", "table_footnote", "code_algorithm", "code_algorithm_caption", "header",
            "footer", "page_footnote", "page_number"]
    dets = [{"category_type": c, "order": i, "text": c} for i, c in enumerate(cats)]
    dets += [{"category_type": c, "order": 99, "text": "not text"} for c in ("equation_isolated", "table", "figure")]
    blank_png(tmp_path / "images" / "p.jpg")
    (tmp_path / "omni.json").write_text(json.dumps([{"page_info": {"image_path": "p.jpg"}, "layout_dets": dets}]))
    assert ocr_read_omnidocbench(str(tmp_path / "omni.json"))[0]["text"] == "\n\n".join(cats)


def test_fox_layout_needs_image_root_and_missing_images_fail_at_load(tmp_path):
    # the official layout: en_page_ocr.json beside en_pdf_png/ holding the pages
    fox = tmp_path / "fox"
    for i in range(3):
        blank_png(fox / "en_pdf_png" / f"en_{i}.png")
    (fox / "en_page_ocr.json").write_text(json.dumps([fox_entry(f"en_{i}.png", f"page {i}") for i in range(3)]))
    items = ocr_read_fox(str(fox / "en_page_ocr.json"), str(fox / "en_pdf_png"))
    assert [it["image"] for it in items] == [str(fox / "en_pdf_png" / f"en_{i}.png") for i in range(3)]
    with pytest.raises(InputError, match=r"3 of 3 images not found, the first: .*en_0\.png.*image_root"):
        ocr_read_fox(str(fox / "en_page_ocr.json"))  # default root: the JSON's folder
    os.remove(fox / "en_pdf_png" / "en_1.png")
    with pytest.raises(InputError, match=r"1 of 3 images not found, the first: .*en_1\.png"):
        ocr_read_fox(str(fox / "en_page_ocr.json"), str(fox / "en_pdf_png"))


@pytest.mark.parametrize("reader,name,content,match", [
    ("jsonl", "a.jsonl", '{"text": "no image"}\n', r"a\.jsonl:1: expected a JSON object"),
    ("jsonl", "a.jsonl", '{"image": "p.png", "text": "ok"}\n{"image": "p.png", "text": 3}\n', r"a\.jsonl:2: expected"),
    ("jsonl", "a.jsonl", '{"image": "p.png", "text": "ok"}\n{oops\n', r"a\.jsonl:2: not valid JSON"),
    ("jsonl", "a.jsonl", '["p.png", "text"]\n', r"a\.jsonl:1: expected a JSON object"),
    ("fox", "fox.json", '{"image": "p.png"}', r"fox\.json: expected a JSON list of Fox entries, got dict"),
    ("fox", "fox.json", '[{"image": "p.png", "conversations": [{"from": "human", "value": "x"}]}]',
     r"fox\.json: entry 0 needs"),
    ("fox", "fox.json", '[{"image": "p.png", "conversations": "text"}]', r"fox\.json: entry 0 needs"),
    ("fox", "fox.json", '[1, 2]', r"fox\.json: entry 0 needs"),
    ("fox", "fox.json", '[{"image": "p.png",', r"fox\.json: not valid JSON"),
    ("omnidocbench", "omni.json", '[{"layout_dets": []}]', r"omni\.json: page 0 needs page_info\.image_path"),
    ("omnidocbench", "omni.json", '[{"page_info": {"image_path": "p.png"}, "layout_dets": {}}]',
     r"omni\.json: page 0 needs"),
    ("omnidocbench", "omni.json", '[{"page_info": {"image_path": "p.png"}, "layout_dets": '
     '[{"category_type": "title", "text": ["a"]}]}]', r"omni\.json: page 0 has a layout_dets text that is not a string"),
    ("omnidocbench", "omni.json", '{"pages": []}', r"omni\.json: expected a JSON list"),
])
def test_bad_annotation_files_are_one_line_errors_naming_the_record(tmp_path, reader, name, content, match):
    blank_png(tmp_path / "p.png")
    (tmp_path / name).write_text(content)
    read = dict(jsonl=ocr_read_jsonl, fox=ocr_read_fox, omnidocbench=ocr_read_omnidocbench)[reader]
    with pytest.raises(InputError, match=match):
        read(str(tmp_path / name), str(tmp_path))

# -----------------------------------------------------------------------------
# end to end: stage 1 (results, PNG, checkpoints), resume, stage 2 from the stage-1 encoder


TINY = ["--image_size=32", "--sam_dim=16", "--sam_window=4", "--neck_dim=8", "--clip_layers=1", "--n_layer=1",
        "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--batch_size=4", "--n_eval=4", "--eval_batch=4",
        "--log_interval=2", "--max_text_tokens=16", "--bench_tokens=4", "--max_lines=1", "--font_sizes=(10,)", "--max_train_seconds=0"]


def run(args):
    r = run_script("train_ocr.py", TINY + args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_end_to_end_stage1_resume_stage2(tmp_path):
    from safetensors.torch import load_file
    out1, out2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    log = run(["--max_steps=2", "--eval_interval=2", "--out_dir=" + out1])
    res = json.load(open(os.path.join(out1, "results.json")))
    assert res["recipe"] == "ocr" and res["step"] == 2 and res["n_eval"] == 4
    meta = json.load(open(os.path.join(out1, "ckpt", "meta.json")))
    assert meta["train_seconds"] == res["train_seconds"] > 0  # the clock a resume continues
    for k in ("ned", "fox_precision", "word_precision", "exact_match", "cos_sam", "cos_clip", "cos_proj",
              "distinct_outputs", "gen_tok_s", "kv_speedup"):
        assert k in res["metrics"], k
    assert res["metrics"]["kv_match"] == 1.0
    # the eval prints the targets on one line and a few diagnostics on the next; every metric is in evals.jsonl
    lines = log.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("eval step 2 | ned "))
    assert "fox_precision" in lines[at] and "collapse_cos" in lines[at] and "kv_speedup" not in lines[at]
    assert lines[at + 1].startswith("  exact_match ") and "cos_proj" in lines[at + 1]
    evals = [json.loads(l) for l in open(os.path.join(out1, "evals.jsonl"))]
    assert [e["step"] for e in evals] == [2] and evals[0]["metrics"] == res["metrics"]
    assert os.path.exists(os.path.join(out1, "ocr_step000002.png"))
    assert os.path.exists(os.path.join(out1, "ckpt", "model.safetensors"))
    enc_keys = load_file(os.path.join(out1, "encoder", "model.safetensors")).keys()
    assert enc_keys and not any(k.startswith("gpt") for k in enc_keys)  # encoder-only
    log = run(["--max_steps=4", "--eval_interval=2", "--init_from=resume", "--out_dir=" + out1, "--n_layer=2"])
    res = json.load(open(os.path.join(out1, "results.json")))
    assert "resumed" in log and res["step"] == 4
    # the checkpoint's shape wins, is printed, and is what results.json records; sam_global comes back from JSON
    # as a list and still equals the config's tuple (no false "from checkpoint" line)
    assert "from checkpoint: n_layer=1 (config said 2)" in log and res["config"]["n_layer"] == 1
    assert "sam_global" not in log
    # eval_only from a checkpoint dir reports that checkpoint's step and seconds (it said step 0)
    run(["--eval_only=True", "--init_from=" + os.path.join(out1, "ckpt"), "--out_dir=" + str(tmp_path / "ev")])
    ev = json.load(open(tmp_path / "ev" / "results.json"))
    assert ev["step"] == 4 and ev["train_seconds"] == res["train_seconds"]
    run(["--max_steps=2", "--eval_interval=2", "--stage=2", "--init_encoder=" + os.path.join(out1, "encoder"),
         "--out_dir=" + out2])
    enc = load_file(os.path.join(out1, "encoder", "model.safetensors"))
    full = load_file(os.path.join(out2, "ckpt", "model.safetensors"))
    sam = [k for k in enc if k.startswith("sam.")]
    assert sam and all(torch.equal(enc[k], full["encoder." + k]) for k in sam)  # SAM frozen in stage 2
    assert not torch.equal(enc["projector.0.weight"], full["encoder.projector.0.weight"])  # the rest trains
    # resuming stage 2 without --stage=2: the checkpoint's stage (SAM stays frozen, the optimizer state fits), and
    # the time budget continues from the checkpoint's clock: 1000 s used of 500 -> one more step, then stop
    meta_path = os.path.join(out2, "ckpt", "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, train_seconds=1000.0), open(meta_path, "w"))
    log = run(["--max_steps=50", "--eval_interval=50", "--init_from=resume", "--max_train_seconds=500",
               "--out_dir=" + out2])
    res = json.load(open(os.path.join(out2, "results.json")))
    assert "from checkpoint: stage=2 (config said 1)" in log and res["stage"] == 2 and res["config"]["stage"] == 2
    assert "stopping at step 3/50" in log and res["step"] == 3 and res["train_seconds"] > 1000
    full3 = load_file(os.path.join(out2, "ckpt", "model.safetensors"))
    assert all(torch.equal(full[k], full3[k]) for k in full if k.startswith("encoder.sam."))


def test_stopped_run_resumes_exactly(tmp_path, monkeypatch):
    # stopped half-way on its time budget and resumed (same max_steps): the uninterrupted run's losses and LRs
    import runtime
    args = ["--max_steps=8", "--eval_interval=4", "--log_interval=1", "--bench_tokens=0"]
    steps = lambda log: [" | ".join(l.split(" | ")[:3]) for l in log.splitlines() if l.startswith("step ")]
    whole = steps(run([*args, "--out_dir=" + str(tmp_path / "whole")]))
    calls = [0]

    def spent_after_4_steps(seconds, budget_s, device="cpu"):
        calls[0] += 1
        return calls[0] >= 4
    monkeypatch.setattr(runtime, "budget_spent", spent_after_4_steps)
    first = run([*args, "--out_dir=" + str(tmp_path / "cut")])
    monkeypatch.undo()
    second = run([*args, "--init_from=resume", "--out_dir=" + str(tmp_path / "cut")])
    assert len(whole) == 8 and steps(first) + steps(second) == whole


def test_unknown_dataset_and_missing_val_data_are_clear_errors(tmp_path):
    r = run_script("train_ocr.py", ["--dataset=foxx", "--out_dir=" + str(tmp_path)])
    assert r.returncode != 0 and "unknown dataset 'foxx'" in r.stderr and "omnidocbench" in r.stderr
    assert "Traceback" not in r.stderr
    blank_png(tmp_path / "p.png")
    (tmp_path / "train.jsonl").write_text('{"image": "p.png", "text": "ab"}\n')
    r = run_script("train_ocr.py", ["--dataset=jsonl", "--train_data=" + str(tmp_path / "train.jsonl"),
                                    "--out_dir=" + str(tmp_path)])
    assert r.returncode != 0 and "val_data" in r.stderr and "Traceback" not in r.stderr


def test_fox_end_to_end_with_image_root(tmp_path):
    # a JSONL training set and Fox's official layout (pages in en_pdf_png/ beside the JSON) through the script
    for i in range(4):
        blank_png(tmp_path / "train" / f"t{i}.png")
        blank_png(tmp_path / "fox" / "en_pdf_png" / f"en_{i}.png")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": f"train/t{i}.png", "text": f"w{i}"}) + "\n"
                                                  for i in range(4)))
    (tmp_path / "fox" / "en_page_ocr.json").write_text(json.dumps([fox_entry(f"en_{i}.png", f"p{i}") for i in range(4)]))
    args = ["--dataset=fox", "--train_data=" + str(tmp_path / "train.jsonl"), "--max_steps=1", "--eval_interval=1",
            "--val_data=" + str(tmp_path / "fox" / "en_page_ocr.json"), "--out_dir=" + str(tmp_path / "run")]
    r = run_script("train_ocr.py", TINY + args)  # the JSON's folder: every page missing, said before training
    assert r.returncode != 0 and "4 of 4 images not found" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "run")
    run(args + ["--image_root=" + str(tmp_path / "fox" / "en_pdf_png")])
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["n_eval"] == 4 and [s["gt"] for s in res["samples"]] == ["p0", "p1", "p2", "p3"]


def test_stage2_without_encoder_is_a_clear_error(tmp_path):
    r = run_script("train_ocr.py", ["--stage=2", "--out_dir=" + str(tmp_path)])
    assert r.returncode != 0 and "init_encoder" in r.stderr and "Traceback" not in r.stderr
