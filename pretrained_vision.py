"""
Pretrained vision encoders into this repo's modules, each loaded exactly or refused (sources, Weights and assign
from pretrained.py). load_vision(src) -> (module, meta); the architecture comes from config.json's model_type:

  sam, sam_vision_model          SAM's image encoder (vision_encoder.*)  -> data_ocr.SAMEncoder, hidden_states() the
                                 neck's output; net_2/net_3 (DeepSeek-OCR's, not SAM's) start fresh
  clip, clip_vision_model        CLIP's vision tower (vision_model.*; a two-tower model's text tower skipped)  -> ViT
  dinov2, dinov2_with_registers  DINOv2 (layer scale folded into the projections)  -> ViT
  siglip, siglip_vision_model    SigLIP's vision tower (pooling head skipped)  -> ViT
  deepseek_vl_v2                 DeepSeek-OCR's DeepEncoder (SAM, net_2/net_3, CLIP on SAM's features, projector,
                                 image_newline, view_seperator) read key by key; its LLM's tensors are never read

A ViT's hidden_states() is transformers' last_hidden_state (class token first where there is one). Recipes build
their own ViT from recipe_vit_config() (the recipe's image size and query settings on the source's shapes) and
copy the loaded weights in. meta: the encoder's shapes and the input normalisation (preprocessor_config.json's,
else the family's documented default; meta['norm_from'] says which).
"""
import os
import re
from dataclasses import asdict, replace

import torch

from model import InputError, ViT, ViTConfig
from pretrained import Weights, assign, read_json_file, resolve_source, safetensors_files

FAMILIES = dict(sam="sam", sam_vision_model="sam", clip="clip", clip_vision_model="clip", dinov2="dinov2",
                dinov2_with_registers="dinov2", siglip="siglip", siglip_vision_model="siglip",
                deepseek_vl_v2="deepencoder")
# transformers' defaults for what a config.json may leave out (Hub configs often do, e.g. SigLIP's)
DEFAULTS = dict(
    sam=dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
             image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4.0,
             mlp_dim=None, use_abs_pos=True, use_rel_pos=True, window_size=14, global_attn_indexes=[2, 5, 8, 11]),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    dinov2=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                use_swiglu_ffn=False, num_register_tokens=0),
    siglip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    deepencoder={})
# each family's documented input normalisation (its image processor's defaults): mean, std
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMS = dict(sam=IMAGENET, dinov2=IMAGENET, clip=((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
             siglip=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), deepencoder=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
ACTS = dict(gelu="gelu", quick_gelu="quick_gelu", gelu_pytorch_tanh="gelu_tanh", gelu_new="gelu_tanh")
FILES = ["*.json", "*.safetensors"]  # what a loader reads from a Hub repo (not its code, images or .bin copies)


def load_vision(src, patch_embed=True):
    """src: a local dir or 'hf:owner/name' in transformers' layout -> (module, meta). patch_embed=False (CLIP,
    SigLIP, DINOv2): a ViT fed tokens in place of its patch embedding, whose weights are then skipped (DeepSeek-OCR
    runs CLIP on SAM's features that way)."""
    path = resolve_source(src, allow_patterns=FILES)
    config = read_json_file(os.path.join(path, "config.json"))
    pre = os.path.join(path, "preprocessor_config.json")
    pre = read_json_file(pre) if os.path.exists(pre) else None
    return vision_from_weights(Weights(safetensors_files(path), where=src), config, pre, patch_embed)


def vision_from_weights(w, config, preprocessor=None, patch_embed=True):
    """The module and meta from a source's Weights, config.json and preprocessor_config.json (or None); every
    key of w taken or skipped by name, else one line naming it."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise InputError(f"{w.where}: unsupported vision model_type {config.get('model_type')!r}: one of "
                         f"{', '.join(FAMILIES)}")
    tower = config.get("vision_config", config) if family in ("sam", "clip", "siglip") else config
    cfg = {**DEFAULTS[family], **tower}
    mean, std = NORMS[family]
    norm_from = f"{family}'s documented default"
    if preprocessor and "image_mean" in preprocessor and "image_std" in preprocessor:
        mean, std, norm_from = preprocessor["image_mean"], preprocessor["image_std"], "preprocessor_config.json"
    mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    if family == "sam":
        module = sam_encoder(w, cfg, mean, std)
    elif family == "deepencoder":
        module = deep_encoder(w, cfg, mean, std)
    else:
        module = dict(clip=clip_vit, dinov2=dinov2_vit, siglip=siglip_vit)[family](w, cfg, mean, std, patch_embed)
    w.finish()
    c = module.config
    meta = dict(family=family, model_type=config["model_type"], image_mean=mean, image_std=std, norm_from=norm_from)
    if isinstance(module, ViT):
        meta.update(width=c.n_embd, layers=c.n_layer, heads=c.n_head, patch=c.patch_size, image_size=c.image_size,
                    prefix_tokens=module.prefix, vit=asdict(c))
    else:
        meta.update(width=c.sam_dim, layers=c.sam_layers, heads=c.sam_heads, patch=c.sam_patch,
                    image_size=c.image_size, encoder=asdict(c))
    return module, meta


# -----------------------------------------------------------------------------
# ViT towers: CLIP, DINOv2, SigLIP


def tower_prefix(w, candidates, anchor):
    """The candidate prefix under which the tower's anchor key exists ('' for a bare tower)."""
    for p in candidates:
        if p + anchor in w:
            return p
    raise InputError(f"{w.where}: no '{anchor}' under {' or '.join(repr(p) for p in candidates)}: not this family's layout")


def act_of(cfg, where):
    if cfg["hidden_act"] not in ACTS:
        raise InputError(f"{where}: unsupported hidden_act {cfg['hidden_act']!r}: one of {', '.join(ACTS)}")
    return ACTS[cfg["hidden_act"]]


def block_state(w, i, n, scales=None):
    """Transformer layer i -> model.ViTBlock i's tensors. n: the source's key stems for q, k, v, o (attention out),
    ln_1, ln_2, fc1, fc2, each with .weight and .bias. The k bias is read and dropped: q . b_k is the same for
    every key, so softmax cancels it exactly (ViTBlock has none). scales: the two layer-scale keys, folded into o
    and fc2 (lambda * (W x + b) = (lambda W) x + lambda b)."""
    b = f"blocks.{i}."
    s = {b + "qkv.weight": torch.cat([w.take(n[x] + ".weight") for x in "qkv"]),
         b + "q_bias": w.take(n["q"] + ".bias"), b + "v_bias": w.take(n["v"] + ".bias")}
    w.take(n["k"] + ".bias")
    for ours, theirs in (("proj", "o"), ("ln_1", "ln_1"), ("ln_2", "ln_2"), ("mlp.0", "fc1"), ("mlp.2", "fc2")):
        s[b + ours + ".weight"], s[b + ours + ".bias"] = w.take(n[theirs] + ".weight"), w.take(n[theirs] + ".bias")
    for ours, key in zip(("proj", "mlp.2"), scales or ()):
        lam = w.take(key)
        s[b + ours + ".weight"], s[b + ours + ".bias"] = s[b + ours + ".weight"] * lam[:, None], s[b + ours + ".bias"] * lam
    return s


def clip_block_names(a):
    """CLIP's and SigLIP's layer key stems under a ('...encoder.layers.i.')."""
    return dict(q=a + "self_attn.q_proj", k=a + "self_attn.k_proj", v=a + "self_attn.v_proj", o=a + "self_attn.out_proj",
                ln_1=a + "layer_norm1", ln_2=a + "layer_norm2", fc1=a + "mlp.fc1", fc2=a + "mlp.fc2")


def patch_state(w, key, patch_embed, with_bias):
    """The patch embedding's tensors, or (patch_embed=False) the keys skipped: the ViT is fed tokens instead."""
    if not patch_embed:
        w.skip(re.escape(key) + r"\.")
        return {}
    s = {"patch.weight": w.take(key + ".weight")}
    if with_bias:
        s["patch.bias"] = w.take(key + ".bias")
    return s


def tower_vit(w, cfg, state, patch_embed, **fields):
    """model.ViT from the source's shapes + fields, the converted state assigned exactly."""
    g = cfg["image_size"] // cfg["patch_size"]
    n_grid = g * g
    c = ViTConfig(image_size=cfg["image_size"], patch_size=cfg["patch_size"], in_chans=cfg["num_channels"],
                  n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"], n_embd=cfg["hidden_size"],
                  norm_eps=cfg["layer_norm_eps"], act=act_of(cfg, w.where), patch_embed=patch_embed,
                  num_tokens=0 if patch_embed else n_grid, **fields)
    return assign(ViT(c), state, w.where)


def clip_vit(w, cfg, mean, std, patch_embed):
    """CLIP's vision tower: class token, position table with the class slot, pre-LayerNorm, quick_gelu; its
    last_hidden_state comes before post_layernorm (which CLIP applies to the pooled class token only)."""
    p = tower_prefix(w, ("vision_model.", ""), "embeddings.position_embedding.weight")
    w.skip(r"text_model\.|text_projection\.|visual_projection\.|logit_scale$")  # the two-tower model's text side
    w.skip(re.escape(p) + r"post_layernorm\.|.*position_ids$")  # pooled output only; an index buffer
    e = p + "embeddings."
    state = {"cls": w.take(e + "class_embedding").view(1, 1, -1), "pos": w.take(e + "position_embedding.weight")[None],
             "ln_pre.weight": w.take(p + "pre_layrnorm.weight"), "ln_pre.bias": w.take(p + "pre_layrnorm.bias"),
             **patch_state(w, e + "patch_embedding", patch_embed, with_bias=False)}
    for i in range(cfg["num_hidden_layers"]):
        state.update(block_state(w, i, clip_block_names(f"{p}encoder.layers.{i}.")))
    return tower_vit(w, cfg, state, patch_embed, mlp_hidden=cfg["intermediate_size"], patch_bias=False,
                     class_token=True, pos_interpolate="bicubic", pre_norm=True, final_norm=False,
                     image_mean=mean, image_std=std)


def siglip_vit(w, cfg, mean, std, patch_embed):
    """SigLIP's vision tower: no class token, tanh GELU, output after post_layernorm; the attention-pooling head
    (vision_model.head.*) is skipped."""
    p = tower_prefix(w, ("vision_model.", ""), "embeddings.position_embedding.weight")
    w.skip(r"text_model\.|logit_scale$|logit_bias$")  # the two-tower model's text side
    w.skip(re.escape(p) + r"head\.|.*position_ids$")  # the pooling head; an index buffer
    e = p + "embeddings."
    state = {"pos": w.take(e + "position_embedding.weight")[None],
             "ln_f.weight": w.take(p + "post_layernorm.weight"), "ln_f.bias": w.take(p + "post_layernorm.bias"),
             **patch_state(w, e + "patch_embedding", patch_embed, with_bias=True)}
    for i in range(cfg["num_hidden_layers"]):
        state.update(block_state(w, i, clip_block_names(f"{p}encoder.layers.{i}.")))
    return tower_vit(w, cfg, state, patch_embed, mlp_hidden=cfg["intermediate_size"], pos_interpolate="bicubic",
                     image_mean=mean, image_std=std)


def dinov2_vit(w, cfg, mean, std, patch_embed):
    """DINOv2 (with registers where the config has them): class token, layer scale (folded), final LayerNorm,
    positions resized to the input grid as transformers does (bicubic; with registers also antialiased)."""
    if cfg["use_swiglu_ffn"] or not cfg["qkv_bias"]:
        raise InputError(f"{w.where}: unsupported DINOv2 variant (use_swiglu_ffn={cfg['use_swiglu_ffn']}, "
                         f"qkv_bias={cfg['qkv_bias']})")
    p = tower_prefix(w, ("dinov2.", ""), "embeddings.position_embeddings")
    e, R = p + "embeddings.", cfg["num_register_tokens"]
    w.skip(re.escape(e) + r"mask_token$")  # masked-image pretraining only
    state = {"cls": w.take(e + "cls_token"), "pos": w.take(e + "position_embeddings"),
             "ln_f.weight": w.take(p + "layernorm.weight"), "ln_f.bias": w.take(p + "layernorm.bias"),
             **patch_state(w, e + "patch_embeddings.projection", patch_embed, with_bias=True)}
    if R:
        state["registers"] = w.take(e + "register_tokens")
    for i in range(cfg["num_hidden_layers"]):
        a = f"{p}encoder.layer.{i}."
        names = dict(q=a + "attention.attention.query", k=a + "attention.attention.key",
                     v=a + "attention.attention.value", o=a + "attention.output.dense", ln_1=a + "norm1",
                     ln_2=a + "norm2", fc1=a + "mlp.fc1", fc2=a + "mlp.fc2")
        state.update(block_state(w, i, names, (a + "layer_scale1.lambda1", a + "layer_scale2.lambda1")))
    return tower_vit(w, cfg, state, patch_embed, mlp_hidden=int(cfg["hidden_size"] * cfg["mlp_ratio"]),
                     class_token=True, n_registers=R, pos_interpolate="bicubic_antialias" if R else "bicubic",
                     image_mean=mean, image_std=std)


# -----------------------------------------------------------------------------
# SAM and DeepSeek-OCR's DeepEncoder (data_ocr's modules)

SAM_HF = dict(patch="patch_embed.projection", block="layers.", ln_1="layer_norm1", ln_2="layer_norm2",
              lin1="mlp.lin1", lin2="mlp.lin2", neck=("neck.conv1", "neck.layer_norm1", "neck.conv2", "neck.layer_norm2"))
SAM_DEEPSEEK = dict(patch="patch_embed.proj", block="blocks.", ln_1="norm1", ln_2="norm2", lin1="mlp.lin1",
                    lin2="mlp.lin2", neck=("neck.0", "neck.1", "neck.2", "neck.3"))


def sam_state(w, p, n, layers, rel_pos):
    """SAM's image encoder under prefix p (names n: transformers' or DeepSeek-OCR's) -> SAMEncoder's tensors."""
    s = {"patch.weight": w.take(f"{p}{n['patch']}.weight"), "patch.bias": w.take(f"{p}{n['patch']}.bias"),
         "pos": w.take(p + "pos_embed")}
    for i in range(layers):
        a, b = f"{p}{n['block']}{i}.", f"blocks.{i}."
        pairs = [("ln_1", n["ln_1"]), ("qkv", "attn.qkv"), ("proj", "attn.proj"), ("ln_2", n["ln_2"]),
                 ("mlp.0", n["lin1"]), ("mlp.2", n["lin2"])]
        for ours, theirs in pairs:
            s[b + ours + ".weight"], s[b + ours + ".bias"] = w.take(a + theirs + ".weight"), w.take(a + theirs + ".bias")
        if rel_pos:
            s[b + "rel_pos_h"], s[b + "rel_pos_w"] = w.take(a + "attn.rel_pos_h"), w.take(a + "attn.rel_pos_w")
    conv1, norm1, conv2, norm2 = n["neck"]
    s.update({"neck.0.weight": w.take(f"{p}{conv1}.weight"), "neck.2.weight": w.take(f"{p}{conv2}.weight"),
              "neck.1.weight": w.take(f"{p}{norm1}.weight"), "neck.1.bias": w.take(f"{p}{norm1}.bias"),
              "neck.3.weight": w.take(f"{p}{norm2}.weight"), "neck.3.bias": w.take(f"{p}{norm2}.bias")})
    return s


def sam_encoder(w, cfg, mean, std):
    """transformers' SAM image encoder (SamModel or SamVisionModel: vision_encoder.*) -> SAMEncoder; the prompt
    encoder and mask decoder are skipped. net_2/net_3 are not SAM's: they keep their fresh init."""
    from data_ocr import EncoderConfig, SAMEncoder  # (OCR's modules: imported only for OCR's sources)
    mlp = cfg["mlp_dim"] or int(cfg["hidden_size"] * cfg["mlp_ratio"])
    if not cfg["use_abs_pos"] or not cfg["qkv_bias"] or cfg["hidden_act"] != "gelu" or mlp != 4 * cfg["hidden_size"]:
        raise InputError(f"{w.where}: unsupported SAM variant (use_abs_pos={cfg['use_abs_pos']}, qkv_bias="
                         f"{cfg['qkv_bias']}, hidden_act={cfg['hidden_act']!r}, mlp {mlp} for width {cfg['hidden_size']})")
    p = tower_prefix(w, ("vision_encoder.", ""), "pos_embed")
    w.skip(r"prompt_encoder\.|mask_decoder\.|shared_image_embedding\.")  # SamModel's prompt side
    c = EncoderConfig(image_size=cfg["image_size"], sam_patch=cfg["patch_size"], sam_dim=cfg["hidden_size"],
                      sam_layers=cfg["num_hidden_layers"], sam_heads=cfg["num_attention_heads"],
                      sam_window=cfg["window_size"], sam_global=tuple(cfg["global_attn_indexes"]),
                      neck_dim=cfg["output_channels"], sam_eps=cfg["layer_norm_eps"], sam_rel_pos=cfg["use_rel_pos"],
                      image_mean=mean, image_std=std)
    sam = SAMEncoder(c)
    own = sam.state_dict()
    state = {**sam_state(w, p, SAM_HF, c.sam_layers, c.sam_rel_pos),
             **{k: v for k, v in own.items() if k.startswith(("net_2.", "net_3."))}}
    return assign(sam, state, w.where)


def deep_encoder(w, cfg, mean, std):
    """DeepSeek-OCR (config.json vision_config.width['sam_vit_b'|'clip-l-14-224'], projector_config) -> DeepEncoder
    with its weights; the LLM's keys are skipped by name and never read."""
    from data_ocr import DeepEncoder, EncoderConfig
    widths = cfg.get("vision_config", {}).get("width", {})
    sam, clip, proj = widths.get("sam_vit_b"), widths.get("clip-l-14-224"), cfg.get("projector_config")
    if not sam or not clip or not proj or proj.get("projector_type") != "linear":
        raise InputError(f"{w.where}: config.json lacks DeepSeek-OCR's vision_config.width['sam_vit_b', "
                         f"'clip-l-14-224'] or a linear projector_config")
    p = tower_prefix(w, ("model.", ""), "sam_model.pos_embed")
    w.skip(re.escape(p) + r"(layers|embed_tokens|norm)\.|lm_head\.")  # the language model: never read
    w.skip(re.escape(p) + r"vision_model\.embeddings\.(patch_embedding\.|position_ids$)")  # CLIP is fed SAM's features
    s = p + "sam_model."
    patch = w.keys(s + "patch_embed.proj.weight")
    window_rows = [k for k in w.keys(s + "blocks.") if k.endswith("attn.rel_pos_h")]
    if not patch or not window_rows:
        raise InputError(f"{w.where}: no SAM patch embedding or relative-position tables under {s!r}")
    sam_patch = w.take(patch[0]).shape[-1]
    windowed = [i for i in range(sam["layers"]) if i not in sam["global_attn_indexes"]]
    window = (w.take(f"{s}blocks.{windowed[0]}.attn.rel_pos_h").shape[0] + 1) // 2 if windowed else 0
    clip_grid = clip["image_size"] // clip["patch_size"]
    c = EncoderConfig(image_size=cfg["vision_config"]["image_size"], sam_patch=sam_patch, sam_dim=sam["width"],
                      sam_layers=sam["layers"], sam_heads=sam["heads"], sam_window=window,
                      sam_global=tuple(sam["global_attn_indexes"]), neck_dim=sam["downsample_channels"][0] // 2,
                      clip_layers=clip["layers"], clip_heads=clip["heads"], out_dim=proj["n_embed"], center=False,
                      sam_eps=1e-6, sam_rel_pos=True, projector="linear", image_mean=mean, image_std=std,
                      clip_vit=dict(num_tokens=clip_grid ** 2, **DEEPSEEK_CLIP))
    enc = DeepEncoder(c)
    state = {"sam." + k: v for k, v in sam_state(w, s, SAM_DEEPSEEK, c.sam_layers, True).items()}
    state.update({"sam.net_2.weight": w.take(s + "net_2.weight"), "sam.net_3.weight": w.take(s + "net_3.weight"),
                  "projector.weight": w.take(p + "projector.layers.weight"),
                  "projector.bias": w.take(p + "projector.layers.bias"),
                  "image_newline": w.take(p + "image_newline"), "view_separator": w.take(p + "view_seperator")})
    state.update({"clip." + k: v for k, v in deepseek_clip_state(w, p + "vision_model.", c.clip_layers).items()})
    return assign(enc, state, w.where)


# CLIP-L as DeepSeek-OCR runs it on SAM's features: its position table (class slot + 16 x 16) resized with
# antialiasing to the feature grid, quick_gelu, pre-LayerNorm, the raw last layer out (no final norm)
DEEPSEEK_CLIP = dict(class_token=True, pre_norm=True, final_norm=False, act="quick_gelu",
                     pos_interpolate="bicubic_antialias")


def deepseek_clip_state(w, p, layers):
    """DeepSeek-OCR's CLIP-L (fused qkv_proj; q, k, v rows in that order) -> a patch_embed=False ViT's tensors."""
    e = p + "embeddings."
    s = {"cls": w.take(e + "class_embedding").view(1, 1, -1), "pos": w.take(e + "position_embedding.weight")[None],
         "ln_pre.weight": w.take(p + "pre_layrnorm.weight"), "ln_pre.bias": w.take(p + "pre_layrnorm.bias")}
    for i in range(layers):
        a, b = f"{p}transformer.layers.{i}.", f"blocks.{i}."
        qkv_b = w.take(a + "self_attn.qkv_proj.bias")
        D = qkv_b.shape[0] // 3  # the k third is dropped: softmax cancels it (ViTBlock)
        s.update({b + "qkv.weight": w.take(a + "self_attn.qkv_proj.weight"), b + "q_bias": qkv_b[:D],
                  b + "v_bias": qkv_b[2 * D:]})
        for ours, theirs in (("proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            s[b + ours + ".weight"], s[b + ours + ".bias"] = w.take(a + theirs + ".weight"), w.take(a + theirs + ".bias")
    return s


# -----------------------------------------------------------------------------
# recipes


def is_foreign(src):
    """True when src is a transformers-layout source (config.json with a model_type) rather than this repo's own
    checkpoint (meta.json). A Hub name is asked for its config files only."""
    if not src:
        return False
    path = resolve_source(src, allow_patterns=["config.json", "meta.json"]) if src.startswith("hf:") else src
    cfg = os.path.join(path, "config.json")
    return os.path.exists(cfg) and "model_type" in read_json_file(cfg)


def recipe_vit_config(meta, where, image_size, patch_size=None, width=None, layers=None, heads=None, **fields):
    """A loaded ViT's config for a recipe: the source's shapes, the recipe's image size (the position table keeps
    the source's grid and is resized when the grid differs) and fields (e.g. query_mode). A patch size, width,
    depth or head count the recipe sets that the source contradicts is one line."""
    if "vit" not in meta:
        raise InputError(f"{where} is a {meta['family']} encoder; this recipe takes a ViT (CLIP, DINOv2, SigLIP)")
    c = ViTConfig(**meta["vit"])
    asked = dict(patch_size=(patch_size, c.patch_size), width=(width, c.n_embd), layers=(layers, c.n_layer),
                 heads=(heads, c.n_head))
    wrong = [f"{k}={mine} (the source has {theirs})" for k, (mine, theirs) in asked.items()
             if mine is not None and mine != theirs]
    if wrong:
        raise InputError(f"{where} contradicts the recipe config: {', '.join(wrong)}")
    if image_size % c.patch_size:
        raise InputError(f"image_size {image_size} is not a multiple of {where}'s patch size {c.patch_size}")
    grid = c.pos_grid or c.image_size // c.patch_size
    if image_size != c.image_size and not c.pos_interpolate:
        raise InputError(f"{where} takes {c.image_size} px images only; the config says image_size={image_size}")
    return replace(c, image_size=image_size, pos_grid=grid, **fields)


def deepencoder_from_towers(sam_src, clip_src, base):
    """OCR's DeepEncoder from a SAM source and a CLIP source: their shapes and weights; net_2, net_3, the projector
    (and any glyph heads) start fresh. base: the recipe's EncoderConfig (out_dim, center, glyph heads)."""
    from data_ocr import DeepEncoder
    sam, sam_meta = load_vision(sam_src)
    clip, clip_meta = load_vision(clip_src, patch_embed=False)
    s, v = sam.config, clip.config
    if sam_meta["family"] != "sam" or clip_meta["family"] not in ("clip", "siglip", "dinov2"):
        raise InputError(f"init_sam must be a SAM source and init_clip a CLIP-like ViT; got {sam_meta['family']} "
                         f"and {clip_meta['family']}")
    if v.n_embd != 4 * s.neck_dim:
        raise InputError(f"init_clip {clip_src} is {v.n_embd} wide but SAM's neck {s.neck_dim} gives "
                         f"{4 * s.neck_dim}-wide features (net_3)")
    clip_vit = {k: val for k, val in asdict(v).items()
                if k not in ("image_size", "patch_size", "in_chans", "n_layer", "n_head", "n_embd", "patch_embed",
                             "query_mode", "attn_temperature")}
    clip_vit["pos_interpolate"] = clip_vit["pos_interpolate"] and "bicubic_antialias"  # as DeepSeek-OCR resizes it
    c = replace(base, image_size=s.image_size, sam_patch=s.sam_patch, sam_dim=s.sam_dim, sam_layers=s.sam_layers,
                sam_heads=s.sam_heads, sam_window=s.sam_window, sam_global=s.sam_global, neck_dim=s.neck_dim,
                sam_eps=s.sam_eps, sam_rel_pos=s.sam_rel_pos, clip_layers=v.n_layer, clip_heads=v.n_head,
                clip_vit=clip_vit, image_mean=s.image_mean, image_std=s.image_std)
    enc = DeepEncoder(c)
    fresh = ("net_2.", "net_3.", "glyph.")
    own_sam = enc.sam.state_dict()
    assign(enc.sam, {**{k: t for k, t in sam.state_dict().items() if not k.startswith(fresh)},
                     **{k: t for k, t in own_sam.items() if k.startswith(fresh)}}, sam_src)
    assign(enc.clip, clip.state_dict(), clip_src)
    return enc


def check_encoder_config(enc, where, **recipe):
    """A loaded DeepEncoder against the recipe's shape keys: a contradiction is one line naming them."""
    wrong = [f"{k}={mine} (the source has {getattr(enc.config, k)})" for k, mine in recipe.items()
             if mine != getattr(enc.config, k)]
    if wrong:
        raise InputError(f"{where} contradicts the recipe config: {', '.join(wrong)}")
