"""Pretrained vision encoders (pretrained_vision.py) against transformers' own models: tiny random models with every
parameter re-randomised, saved with save_pretrained, loaded through load_vision, final hidden states compared in
fp32. DeepSeek-OCR's DeepEncoder from shards written with its key names (LLM keys included, never read), checked
against transformers' SAM and a direct transcription of DeepSeek-OCR's CLIP forward."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from model import InputError, ViT, ViTConfig  # noqa: E402
from pretrained import Weights, safetensors_files  # noqa: E402
from pretrained_vision import load_vision, recipe_vit_config, vision_from_weights  # noqa: E402

TOL = 1e-4


def randomise(m, seed=0, std=0.3):
    """Every parameter redrawn (default inits of zeros and ones would hide swapped norms and missing gains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def saved(m, path, preprocessor=None):
    m.save_pretrained(str(path))
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(path)


def pixels(h, w, b=2, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_close(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    assert err < TOL, f"max abs difference {err:.2e} (outputs up to {ref.abs().max().item():.1f})"


# -- each family exactly


SAM_CFG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=40, patch_size=4,
               output_channels=16, window_size=4, global_attn_indexes=[1], mlp_dim=128)  # grid 10: windows padded to 12


@pytest.mark.parametrize("two_tower", [False, True])
def test_sam_neck_output_equals_transformers(tmp_path, two_tower):
    T = transformers
    vis = T.SamVisionConfig(**SAM_CFG)
    hf = randomise(T.SamModel(T.SamConfig(vision_config=vis.to_dict())) if two_tower else T.SamVisionModel(vis))
    enc, meta = load_vision(saved(hf, tmp_path))
    x = pixels(40, 40)
    with torch.no_grad():
        ref = hf.get_image_embeddings(x) if two_tower else hf(pixel_values=x).last_hidden_state
        ours = enc.eval().hidden_states(x)
    assert_close(ours, ref.flatten(2).transpose(1, 2))
    assert meta["family"] == "sam" and meta["width"] == 32 and meta["patch"] == 4 and meta["image_size"] == 40
    assert meta["image_std"] == (0.229, 0.224, 0.225) and "default" in meta["norm_from"]


CLIP_VIS = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)


def two_tower_or_vision(family, two_tower):
    """A random CLIPModel / SiglipModel (text tower included) or the vision model alone -> (model, vision tower)."""
    T = transformers
    Model, Config, Vision, VisionConfig = dict(
        clip=(T.CLIPModel, T.CLIPConfig, T.CLIPVisionModel, T.CLIPVisionConfig),
        siglip=(T.SiglipModel, T.SiglipConfig, T.SiglipVisionModel, T.SiglipVisionConfig))[family]
    if not two_tower:
        hf = randomise(Vision(VisionConfig(**CLIP_VIS)))
        return hf, hf
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    hf = randomise(Model(Config(vision_config=CLIP_VIS, text_config=text)))
    return hf, hf.vision_model


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("two_tower", [False, True])
def test_clip_and_siglip_last_hidden_state_equal_transformers(tmp_path, family, two_tower):
    hf, tower = two_tower_or_vision(family, two_tower)
    pre = dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]) if family == "clip" else None
    vit, meta = load_vision(saved(hf, tmp_path, pre))
    x = pixels(32, 32)
    with torch.no_grad():
        ref = tower(pixel_values=x).last_hidden_state
        ours = vit.eval().hidden_states(x)
    # CLIP: (B, 1 + 16, 32), class token first, before post_layernorm; SigLIP: (B, 16, 32) after it
    assert_close(ours, ref)
    assert vit.encode(x)["features"].shape == (2, 16, 32)  # the patches alone, for recipes
    if family == "clip":
        assert meta["image_mean"] == (0.1, 0.2, 0.3) and meta["norm_from"] == "preprocessor_config.json"
    else:
        assert vit.prefix == 0 and meta["image_mean"] == (0.5, 0.5, 0.5) and "default" in meta["norm_from"]


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2_interpolated_positions_equal_transformers(tmp_path, registers):
    T = transformers
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    hf = randomise(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=registers, **cfg))
                   if registers else T.Dinov2Model(T.Dinov2Config(**cfg)))
    vit, meta = load_vision(saved(hf, tmp_path))
    x = pixels(48, 40)  # a 6 x 5 grid from the config's 4 x 4 table
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        ours = vit.eval().hidden_states(x)
    assert_close(ours, ref)  # (B, 1 + registers + 30, 32)
    assert ours.shape[1] == 1 + registers + 30 and vit.prefix == 1 + registers
    assert meta["family"] == "dinov2" and meta["image_mean"] == (0.485, 0.456, 0.406)


def test_a_dropped_key_bias_changes_no_read():
    """The loaders drop a source's k bias: q . b_k is one number per query, the same for every key it scores,
    so softmax cancels it in the encoder and in query reads alike. Shown on a read: keys shifted by one bias
    vector (patch keys and the query's own key) give the same outputs."""
    torch.manual_seed(0)
    vit = randomise(ViT(ViTConfig(n_layer=2, n_embd=32, n_head=4, image_size=16, patch_size=4)), std=0.5)
    cache = vit.encode(pixels(16, 16))
    queries = torch.randn(2, 3, 32)
    out, maps = vit.read(queries, cache)
    b_k = torch.randn(32) * 3
    for block in vit.blocks:
        heads = block.heads
        block.heads = lambda x, heads=heads: (lambda q, k, v: (q, k + b_k.view(1, 4, 1, 8), v))(*heads(x))
    shifted = dict(kv=[(k + b_k.view(1, 4, 1, 8), v) for k, v in cache["kv"]])
    out2, maps2 = vit.read(queries, shifted)
    assert_close(out2, out)
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(maps, maps2))


# -- query tokens over a loaded DINOv2


def test_deep_queries_read_a_loaded_dinov2_without_touching_its_patches(tmp_path):
    T = transformers
    hf = randomise(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_register_tokens=2)))
    vit, meta = load_vision(saved(hf, tmp_path))
    vit = ViT(recipe_vit_config(meta, "dinov2", 24, query_mode="deep")).eval()  # a recipe's ViT at 24 px
    vit.load_state_dict(load_vision(str(tmp_path))[0].state_dict())
    x = pixels(24, 24)
    with torch.no_grad():
        alone = hf(pixel_values=x).last_hidden_state
        cache = vit.encode(x)
        before = [k.clone() for k, _ in cache["kv"]]
        q1, q2 = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
        out1, maps1 = vit.read(q1, cache)
        out2, _ = vit.read(q2, cache)
        again = vit.encode(x)
    assert torch.equal(again["features"], cache["features"]) and all(torch.equal(a, k) for a, (k, _) in zip(before, cache["kv"]))
    assert_close(cache["hidden"], alone)  # the encoder alone, exactly as transformers
    assert torch.equal(cache["features"], cache["hidden"][:, 3:])  # patches after the class token and 2 registers
    assert (out1 - out2).abs().max() > 1e-3  # different queries read different things
    assert len(maps1) == 2 and maps1[0].shape == (2, 1, 9)  # a map over the 3 x 3 patches per layer (deep)
    assert (maps1[0].sum(-1) < 1).all()  # (the class token and registers hold the rest of the attention)


# -- DeepSeek-OCR's DeepEncoder


SAM_DS = {"neck.conv1": "neck.0", "neck.layer_norm1": "neck.1", "neck.conv2": "neck.2", "neck.layer_norm2": "neck.3",
          "patch_embed.projection": "patch_embed.proj", "layers.": "blocks.", "layer_norm1": "norm1",
          "layer_norm2": "norm2"}  # (the neck's names first: they contain the blocks')


def deepseek_sam_name(k):
    """transformers' SAM key -> DeepSeek-OCR's (the same maths under other names)."""
    for a, b in SAM_DS.items():
        k = k.replace(a, b)
    return k


def deepseek_clip_forward(t, p, feats, heads):
    """DeepSeek-OCR's VitModel on SAM features (deepencoder's CLIPVisionEmbeddings with patch_embeds given,
    get_abs_pos, pre_layrnorm, NoTPTransformer), transcribed from its equations."""
    B, N, D = feats.shape
    x = torch.cat([t[p + "embeddings.class_embedding"].expand(B, 1, D), feats], 1)
    pos = t[p + "embeddings.position_embedding.weight"]
    src, tgt = math.isqrt(pos.shape[0] - 1), math.isqrt(N)
    grid = F.interpolate(pos[1:].view(1, src, src, D).permute(0, 3, 1, 2), size=(tgt, tgt), mode="bicubic",
                         antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(tgt * tgt, D)
    x = F.layer_norm(x + torch.cat([pos[:1], grid]), (D,), t[p + "pre_layrnorm.weight"], t[p + "pre_layrnorm.bias"])
    i = 0
    while f"{p}transformer.layers.{i}.layer_norm1.weight" in t:
        a = f"{p}transformer.layers.{i}."
        ln = lambda y, n: F.layer_norm(y, (D,), t[a + n + ".weight"], t[a + n + ".bias"])  # noqa: E731
        lin = lambda y, n: F.linear(y, t[a + n + ".weight"], t[a + n + ".bias"])  # noqa: E731
        q, k, v = lin(ln(x, "layer_norm1"), "self_attn.qkv_proj").view(B, -1, 3, heads, D // heads).unbind(2)
        o = F.scaled_dot_product_attention(*(z.permute(0, 2, 1, 3) for z in (q, k, v)))
        x = x + lin(o.permute(0, 2, 1, 3).reshape(B, -1, D), "self_attn.out_proj")
        h = lin(ln(x, "layer_norm2"), "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), "mlp.fc2")
        i += 1
    return x


def write_deepseek_ocr(path):
    """A tiny DeepSeek-OCR: its config.json and two shards with its key names, SAM from a random transformers
    SAM (so its neck is checked against transformers), the rest random; LLM tensors in both shards."""
    T = transformers
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sam = randomise(T.SamVisionModel(T.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4, output_channels=8,
        window_size=3, global_attn_indexes=[1], mlp_dim=128)), seed=4)  # grid 8: windows of 3 padded to 9
    t = {"model.sam_model." + deepseek_sam_name(k[len("vision_encoder."):]): v.clone()
         for k, v in sam.state_dict().items()}
    t.update({"model.sam_model.net_2.weight": rnd(16, 8, 3, 3), "model.sam_model.net_3.weight": rnd(32, 16, 3, 3)})
    c = "model.vision_model."
    t.update({c + "embeddings.class_embedding": rnd(32), c + "embeddings.patch_embedding.weight": rnd(32, 3, 4, 4),
              c + "embeddings.position_embedding.weight": rnd(10, 32),  # class slot + 3 x 3, resized to q x q = 2 x 2
              c + "embeddings.position_ids": torch.arange(10)[None],
              c + "pre_layrnorm.weight": rnd(32), c + "pre_layrnorm.bias": rnd(32)})
    for i in range(2):
        a = f"{c}transformer.layers.{i}."
        t.update({a + "self_attn.qkv_proj.weight": rnd(96, 32), a + "self_attn.qkv_proj.bias": rnd(96),
                  a + "self_attn.out_proj.weight": rnd(32, 32), a + "self_attn.out_proj.bias": rnd(32),
                  a + "mlp.fc1.weight": rnd(128, 32), a + "mlp.fc1.bias": rnd(128), a + "mlp.fc2.weight": rnd(32, 128),
                  a + "mlp.fc2.bias": rnd(32)})
        for n in ("layer_norm1", "layer_norm2"):
            t.update({a + n + ".weight": rnd(32), a + n + ".bias": rnd(32)})
    t.update({"model.projector.layers.weight": rnd(24, 64), "model.projector.layers.bias": rnd(24),
              "model.image_newline": rnd(24), "model.view_seperator": rnd(24)})
    llm = {"model.embed_tokens.weight": rnd(50, 24), "model.layers.0.self_attn.q_proj.weight": rnd(24, 24),
           "model.layers.0.mlp.gate_proj.weight": rnd(48, 24), "model.norm.weight": rnd(24), "lm_head.weight": rnd(50, 24)}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in t.items() if "sam_model" in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in t.items() if "sam_model" not in k}}
    shards["model-00001-of-00002.safetensors"].update(dict(list(llm.items())[:2]))
    shards["model-00002-of-00002.safetensors"].update(dict(list(llm.items())[2:]))
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ts in shards.items() for k in ts}}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_vl_v2", "projector_config": {"projector_type": "linear", "input_dim": 64, "n_embed": 24},
        "vision_config": {"image_size": 32, "width": {
            "sam_vit_b": {"width": 32, "layers": 2, "heads": 2, "global_attn_indexes": [1], "downsample_channels": [16, 32]},
            "clip-l-14-224": {"width": 32, "layers": 2, "heads": 4, "image_size": 12, "patch_size": 4}}},
        "language_config": {"hidden_size": 24}}))
    return t, llm, sam


def test_deepseek_ocr_shards_load_into_the_deepencoder_and_the_llm_is_never_read(tmp_path):
    t, llm, sam = write_deepseek_ocr(tmp_path)
    w = Weights(safetensors_files(str(tmp_path)), where="deepseek")
    enc, meta = vision_from_weights(w, json.loads((tmp_path / "config.json").read_text()))
    assert not (w.read & set(llm)) and set(llm) <= w.taken  # skipped by name, never read
    c = enc.config
    assert (c.image_size, c.sam_patch, c.sam_window, c.sam_global, c.neck_dim, c.q, c.out_dim) == (32, 4, 3, (1,), 8, 2, 24)
    x = pixels(32, 32)
    with torch.no_grad():
        enc.eval()
        neck = sam(x).last_hidden_state  # transformers' SAM on the same tensors
        assert_close(enc.sam.hidden_states(x), neck.flatten(2).transpose(1, 2))
        feats = F.conv2d(F.conv2d(neck, t["model.sam_model.net_2.weight"], stride=2, padding=1),
                         t["model.sam_model.net_3.weight"], stride=2, padding=1).flatten(2).transpose(1, 2)
        clip = deepseek_clip_forward(t, "model.vision_model.", feats, heads=4)
        proj = F.linear(torch.cat([clip[:, 1:], feats], -1), t["model.projector.layers.weight"],
                        t["model.projector.layers.bias"]).view(2, 2, 2, 24)
        rows = torch.cat([proj, t["model.image_newline"].expand(2, 2, 1, 24)], 2).reshape(2, 6, 24)
        ref = torch.cat([rows, t["model.view_seperator"].expand(2, 1, 24)], 1)  # (q+1)*q+1 = 7 tokens
        assert_close(enc(x), ref)
    assert meta["family"] == "deepencoder" and meta["image_mean"] == (0.5, 0.5, 0.5)
    enc2, _ = load_vision(str(tmp_path))  # the same through a directory
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()))


# -- bad input, one line each


def test_bad_sources_are_one_line_each(tmp_path):
    T = transformers
    hf = randomise(T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_VIS)))
    path = saved(hf, tmp_path / "clip")
    state = load_file(os.path.join(path, "model.safetensors"))  # the names as saved
    cases = []
    (tmp_path / "resnet").mkdir()
    save_file(state, str(tmp_path / "resnet" / "model.safetensors"))
    (tmp_path / "resnet" / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    cases.append((str(tmp_path / "resnet"), r"unsupported vision model_type 'resnet'"))
    for name, tensors in (("extra", {**state, "vision_model.extra.weight": torch.zeros(2)}),
                          ("missing", {k: v for k, v in state.items() if "layers.1.mlp.fc2.weight" not in k})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
        cases.append((str(tmp_path / name), "vision_model.extra.weight" if name == "extra" else
                      "missing weight 'encoder.layers.1.mlp.fc2.weight'"))
    cases.append((str(tmp_path / "nowhere"), "no such directory"))
    for src, match in cases:
        with pytest.raises(InputError, match=match) as e:
            load_vision(src)
        assert "\n" not in str(e.value)
    _, meta = load_vision(path)
    for kw, match in ((dict(patch_size=16), r"patch_size=16 \(the source has 8\)"),
                      (dict(width=64), r"width=64 \(the source has 32\)")):
        with pytest.raises(InputError, match=match):
            recipe_vit_config(meta, "hf:clip", 32, **kw)
    with pytest.raises(InputError, match="not a multiple"):
        recipe_vit_config(meta, "hf:clip", 36)


# -- a recipe on a loaded encoder


def test_foveated_trains_on_a_frozen_loaded_dinov2_and_leaves_it_bit_identical(tmp_path):
    from inprocess import run_script
    T = transformers
    hf = randomise(T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                image_size=32, patch_size=4)))  # 8 x 8 table, run at 4 x 4
    src = saved(hf, tmp_path / "dinov2")
    args = ["--device=cpu", "--n_frames=4", "--image_size=16", "--vit_layers=2", "--vit_width=32", "--n_embd=32",
            "--n_layer=1", "--query_dim=32", "--latent_channels=4", "--n_distractors=2", "--batch_size=4",
            "--n_eval=4", "--eval_batch=4", "--n_caption_eval=1", "--caption_tokens=40", "--n_vis=0",
            "--log_interval=1", "--max_steps=3", "--eval_interval=100", "--coord_channels=False",
            f"--vit_init={src}", "--freeze_vit=True", f"--out_dir={tmp_path / 'run'}"]
    p = run_script("train_foveated.py", args, env=dict(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step 3/3" in p.stdout
    trained = load_file(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    loaded = load_vision(src)[0].state_dict()
    assert loaded and all(torch.equal(trained["vit." + k], v) for k, v in loaded.items())
    meta = json.loads((tmp_path / "run" / "ckpt" / "meta.json").read_text())
    assert meta["vit"]["class_token"] and meta["vit"]["pos_grid"] == 8 and meta["vit"]["image_mean"] == [0.485, 0.456, 0.406]
    bad = run_script("train_foveated.py", [*args[:-1], "--patch_size=8", f"--out_dir={tmp_path / 'bad'}"])
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: {src} contradicts the recipe config: patch_size=8 (the source has 4)"]


def test_ocr_trains_on_deepseek_ocrs_encoder_with_sam_frozen(tmp_path):
    from inprocess import run_script
    (tmp_path / "ds").mkdir()
    write_deepseek_ocr(tmp_path / "ds")
    args = ["--image_size=32", "--sam_dim=32", "--n_layer=1", "--n_embd=24", "--n_head=2", "--n_kv_head=2",
            "--batch_size=4", "--n_eval=4", "--eval_batch=4", "--log_interval=1", "--max_text_tokens=16",
            "--bench_tokens=0", "--max_lines=1", "--font_sizes=(10,)", "--max_steps=2", "--eval_interval=100",
            f"--init_encoder={tmp_path / 'ds'}", f"--out_dir={tmp_path / 'run'}"]
    r = run_script("train_ocr.py", args, env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    trained = load_file(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    loaded = load_vision(str(tmp_path / "ds"))[0].state_dict()
    assert all(torch.equal(trained["encoder." + k], v) for k, v in loaded.items() if k.startswith("sam."))
    assert not torch.equal(trained["encoder.projector.weight"], loaded["projector.weight"])  # the rest trains
    bad = run_script("train_ocr.py", [*args[:-1], "--sam_dim=16", f"--out_dir={tmp_path / 'bad'}"])
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'ds'} contradicts the recipe config: sam_dim=16 (the source has 32)"]


def test_seg_trains_from_a_loaded_siglip(tmp_path):
    """Seg's ViT takes any supported ViT source: the SigLIP's shapes and weights at step 0 (the ckpt of a
    1-step run with lr 0 holds them unchanged), its normalisation in the checkpoint's meta."""
    from inprocess import run_script
    T = transformers
    hf = randomise(T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=4)))
    src = saved(hf, tmp_path / "siglip")  # a 4 x 4 table, run at 32 px: 8 x 8 patches
    args = ["--vit_layers=1", "--vit_embd=32", "--vit_heads=2", "--n_layer=1", "--n_embd=32", "--n_head=2",
            "--n_kv_head=2", "--dec_dim=16", "--batch_size=4", "--n_eval=4", "--eval_batch_size=4", "--n_vis=0",
            "--log_interval=1", "--max_caption_len=8", "--stage_a_steps=1", "--max_steps=1", "--eval_interval=100",
            "--lr=0", f"--vit_init={src}", f"--out_dir={tmp_path / 'run'}"]
    r = run_script("train_seg_gumbel.py", args, env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    trained = load_file(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    loaded = load_vision(src)[0].state_dict()
    for part in ("student", "teacher"):
        assert all(torch.equal(trained[f"{part}.vit.{k}"], v) for k, v in loaded.items())
    meta = json.loads((tmp_path / "run" / "ckpt" / "meta.json").read_text())
    assert meta["vit"]["act"] == "gelu_tanh" and meta["vit"]["pos_interpolate"] == "bicubic"


def test_ocr_encoder_from_a_sam_and_a_clip(tmp_path):
    """init_sam + init_clip: SAM's and CLIP's weights in place (CLIP without its patch embedding, fed SAM's
    features); net_2, net_3, the projector and the glyph head start fresh."""
    from data_ocr import DeepEncoder, EncoderConfig
    from pretrained_vision import deepencoder_from_towers
    T = transformers
    sam = randomise(T.SamVisionModel(T.SamVisionConfig(**{**SAM_CFG, "output_channels": 8, "image_size": 48,
                                                          "window_size": 5})))  # 12 x 12 patches, windows padded
    clip = randomise(T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_VIS)))  # 32 wide = 4 x SAM's neck
    base = EncoderConfig(out_dim=24, glyph_classes=5)
    enc = deepencoder_from_towers(saved(sam, tmp_path / "sam"), saved(clip, tmp_path / "clip"), base).eval()
    x = pixels(48, 48)
    with torch.no_grad():
        assert_close(enc.sam.hidden_states(x), sam(pixel_values=x).last_hidden_state.flatten(2).transpose(1, 2))
        assert enc(x).shape == (2, (3 + 1) * 3 + 1, 24)  # 12 x 12 patches, two stride-2 convs: q = 3
    clip_alone = load_vision(str(tmp_path / "clip"), patch_embed=False)[0].state_dict()
    assert clip_alone.keys() == enc.clip.state_dict().keys() and "patch.weight" not in clip_alone
    assert all(torch.equal(enc.clip.state_dict()[k], v) for k, v in clip_alone.items())
    assert enc.sam.glyph is not None and isinstance(enc, DeepEncoder)  # the recipe's glyph head, fresh
    assert enc.config.clip_vit["class_token"] and enc.config.image_mean == (0.485, 0.456, 0.406)
    with pytest.raises(InputError, match="56 wide but SAM's neck 8"):
        wide = randomise(T.CLIPVisionModel(T.CLIPVisionConfig(**{**CLIP_VIS, "hidden_size": 56})))
        deepencoder_from_towers(str(tmp_path / "sam"), saved(wide, tmp_path / "wide"), base)
