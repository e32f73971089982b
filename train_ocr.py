"""
nano DeepSeek-OCR: a DeepEncoder (SAM-like windowed ViT -> neck -> two stride-2 convs -> CLIP-like ViT fed those
features -> concat -> projector; data_ocr.py) in front of the shared GPT, trained to read text from images.

    python train_ocr.py                         # synthetic documents, 2-core CPU, 6800 steps
    python train_ocr.py --overfit=True          # tier 1: 10 samples, must reach 10/10 exact
    python train_ocr.py --stage=2 --init_encoder=out/ocr-.../encoder   # SAM frozen, fresh GPT
    python train_ocr.py config/ocr_gundam.py    # crop mode on 128 x 128 pages: a 64 px global view + 2 x 2 crops
    torchrun --nproc_per_node=8 train_ocr.py config/ocr_fox.py --train_data=train.jsonl   # GPU scale, Fox eval

Prompt: <|bos|> <|image|> x ((q+1)*q+1) "\\nFree OCR." -> text <|eos|> (crop mode: vision_token_count(grid)
image tokens). The image token is special (inserted by id, never generated). Every eval scores generated text
(rollout, not teacher-forced) and runs a collapse monitor: the mean pairwise cosine similarity of pooled vision
features at the SAM, CLIP and projected stages over a fixed probe set (noise, white, black, a text page).
Collapsed features answer every page with the same text; the projected tokens are batch-centred (BatchCenter)
against it by default. Notes: notes/ocr.md.
"""
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from runtime import install_error_hook
install_error_hook()
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig, InputError, set_checkpointing  # noqa: E402
from runtime import (Clock, Logger, check_finite, configure_optimizers, get_lr, global_mean, log_line,  # noqa: E402
                     mean_across_ranks, set_lr, setup, sync_grads, teardown, wrap,
                     MemoryPlan, kv_cache_bytes, plan_probe)
from checkpoint import (adopt_checkpoint_config, load_checkpoint, rng_state, save_checkpoint,  # noqa: E402
                        set_rng_state, unwrap)
from data import Tokenizer, batch_indices, load_image, normalize  # noqa: E402
from data_ocr import (OCR_GLYPH_CLASSES, OCR_STYLES, OCR_TOKEN_SLOTS, BatchCenter, DeepEncoder,  # noqa: E402
                      EncoderConfig, OCRModel, TiledPages, fox_word_metrics, load_encoder, model_from_meta,
                      ocr_draw_predictions, ocr_metrics, ocr_page_layout, ocr_pairwise_cosine, ocr_parse_layout,
                      ocr_probe_images, ocr_read_fox, ocr_read_jsonl, ocr_read_omnidocbench, ocr_shared_spread,
                      ocr_synthetic_sample, ocr_tile_sample, train_flops, vision_token_count)

# -----------------------------------------------------------------------------
# config (defaults: the 2-core CPU run on synthetic pages)
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
torch_threads = 0          # 0 = auto (OMP_NUM_THREADS, else the cores shared among this node's processes)
# data
dataset = 'synthetic'      # 'synthetic' | 'jsonl' (train_data/val_data) | 'fox' | 'omnidocbench' (val_data)
train_data = ''
val_data = ''
image_root = ''            # folder of val_data's images ('' = the reader's default: fox and jsonl the file's folder,
                           #   omnidocbench images/ beside it)
image_size = 64
font_sizes = (10, 11)
max_lines = 3
min_lines = 1              # each page has min_lines..max_lines lines (as many as fit)
line_chars = 0             # > 0: lines of at most this many characters (0: as many as fit the page's width)
layouts = ()               # e.g. ('3x9', '6x16'): pages of LINESxCHARS in turn, each filling the page (pitch, line gap
                           #   and font from ocr_page_layout, in place of font_sizes, the line knobs, pitch, line_gap)
styles = ('paragraph', 'receipt', 'label')  # synthetic document styles drawn from
noise = 0.04
paper = (200, 255)         # paper grey level range (0-255)
ink = (0, 90)              # ink grey level range
pitch = 7                  # > 0: typewriter layout, one character per `pitch` px cell (0: proportional)
line_gap = 16              # > 0: lines on a fixed grid `line_gap` px apart (0: random line positions)
max_text_tokens = 48       # longer targets are cut (and counted); also the generation budget
page_width = 0             # synthetic page size in px (0: image_size); a page larger than image_size needs crop_mode
page_height = 0
# tiling, DeepSeek-OCR's crop mode ("Gundam"): a global view of the page at image_size, plus crop_size crops (2..9,
# by aspect ratio) of pages larger than one crop; the vision tokens: vision_token_count(..., grid)
crop_mode = False
crop_size = 64             # the local crop size (DeepSeek-OCR: 640 px crops, a 1024 px global view)
min_crops = 2
max_crops = 9
# DeepEncoder: SAM-like windowed ViT -> neck -> 2 stride-2 convs -> CLIP-like ViT -> concat -> projector
sam_patch = 4
sam_dim = 64
sam_layers = 2
sam_heads = 4
sam_window = 8             # window size in patches (0 = global everywhere)
sam_global = (1,)          # layers with global attention (SAM ViT-B: 2, 5, 8, 11)
neck_dim = 32              # SAM neck width; the convs give 2x then 4x this, which is CLIP's width
clip_layers = 1
clip_heads = 4
center_vision = True       # BatchCenter the projected vision tokens (against collapse; False = DeepSeek's path)
glyph_weight = 1.0         # stage 1 on synthetic typewriter pages (pitch > 0): weight of a per-patch "which character
                           #   is here" cross-entropy on SAM's last block (0 = off; no labels on real data)
slot_weight = 1.0          # ... and of "which characters does this vision token cover, left to right" on the
                           #   projected tokens (3 slots per token; 0 = off)
# GPT
n_layer = 3
n_head = 4
n_kv_head = 4
n_embd = 128
tokenizer = 'bytes'        # data.Tokenizer base: 'bytes' or a tiktoken name available offline
# stages
stage = 1                  # 1: everything trainable; 2: SAM frozen, encoder from init_encoder
init_encoder = ''          # encoder-only checkpoint dir (saved by stage 1 as <out_dir>/encoder), or DeepSeek-OCR's trained
                           #   DeepEncoder (hf:deepseek-ai/DeepSeek-OCR or a local copy; the shape keys must match it)
init_sam = ''              # a transformers SAM (e.g. hf:facebook/sam-vit-base) and a CLIP vision tower (e.g.
init_clip = ''             #   hf:openai/clip-vit-large-patch14) for the encoder; net_2/net_3 and the projector start fresh
freeze_sam = None          # SAM (+ neck, net_2, net_3) frozen; None: on with a pretrained SAM (init_sam, or a
                           #   transformers-layout init_encoder); stage 2 always freezes it
init_gpt = ''              # a pretrained LLM (dir or hf:owner/name: nanochat, Llama family, this repo's GPT): its
                           #   weights, shape and tokenizer, the recipe's special tokens appended ('' = from scratch)
text_ratio = 0.0           # share of text-only batches (DDP then needs find_unused_parameters)
# training
overfit = False            # tier 1: train and evaluate on the first 10 training samples
overfit_steps = 300
max_steps = 6800
max_train_seconds = 0.0    # opt-in cap: > 0 stops after this many training seconds, the LR decaying on steps or
                           #   seconds, whichever is further along (0 = steps only, step-exact)
batch_size = 16            # per micro-batch and process
grad_accum_steps = 1       # micro-batches per step: a step trains on batch_size * grad_accum_steps * processes pages
activation_checkpointing = False  # recompute each SAM / CLIP / GPT block in the backward (less memory, more compute)
plan = False                 # print the memory plan (two traced steps: runtime.MemoryPlan), then stop
plan_gpu_gib = 0.0           # the GPU size the plan fits the batch to (0: the visible GPU, else 80 GiB)
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 25
eval_interval = 1500       # and at the end
n_eval = 200
eval_batch = 100
collapse_warn = 0.95
bench_tokens = 32          # KV-cache vs recomputation generation benchmark at the end (0 = skip)
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'ocr'
push_to_hub = ''           # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
config = configure(globals())

RECIPE = 'ocr'
TARGETS = {"ned": ("<=", 0.05), "fox_precision": (">=", 0.95), "collapse_cos": ("<", 0.95)}
DIAGNOSTICS = ("exact_match", "distinct_outputs", "word_f1", "cos_sam", "cos_clip", "cos_proj", "compression")
# the model's shape: a run from a checkpoint takes these from it, and says so
MODEL_KEYS = ("image_size", "sam_patch", "sam_dim", "sam_layers", "sam_heads", "sam_window", "sam_global", "neck_dim",
              "clip_layers", "clip_heads", "center_vision", "n_layer", "n_head", "n_kv_head", "n_embd", "max_text_tokens")
PROMPT = "\nFree OCR."
DATASETS = ('synthetic', 'jsonl', 'fox', 'omnidocbench')

# bad input fails here, before any run dir exists (setup() checks push_to_hub)
if stage not in (1, 2):
    raise InputError(f"stage must be 1 or 2, got {stage}")
if dataset not in DATASETS:
    raise InputError(f"unknown dataset {dataset!r}: one of {', '.join(DATASETS)}")
if dataset != 'synthetic' and not val_data and not overfit:  # (overfit evaluates on its 10 training pages)
    raise InputError(f"dataset={dataset!r} evaluates on val_data= (its {dataset} annotation file), which is not set")
if stage == 2 and not init_encoder and init_from in ('scratch', ''):
    raise InputError("stage=2 trains on a stage-1 encoder: pass --init_encoder=<out_dir>/encoder")
if not crop_mode and max(page_width, page_height) > image_size:
    raise InputError(f"a {page_width or image_size} x {page_height or image_size} page is larger than image_size "
                     f"{image_size}: read it with crop_mode=True (a global view plus crops)")
LAYOUTS = [ocr_parse_layout(t) for t in layouts]
if not styles or set(styles) - set(OCR_STYLES):
    raise InputError(f"styles must be a non-empty tuple of {OCR_STYLES}, got {styles!r}")
if crop_mode and not 1 <= min_crops <= max_crops:
    raise InputError(f"crops: need 1 <= min_crops <= max_crops, got {min_crops} and {max_crops}")

# -----------------------------------------------------------------------------
# setup

# a resume or an eval also takes the checkpoint's stage: a stage-2 run resumed as stage 1 would unfreeze SAM (and
# no longer fit its optimizer state), an eval would record the wrong stage; checkpoints without the key are stage 1
run = setup(config, RECIPE, MODEL_KEYS + (('stage',) if init_from == 'resume' or eval_only else ()),
            absent=lambda meta: dict(stage=meta.get('stage', 1)))
globals().update(config)
device, master, ctx = run.device, run.master, run.ctx
logger = Logger(run, RECIPE, config, wandb_log, wandb_project, wandb_run_name)
if overfit:
    max_steps, n_eval, max_train_seconds = overfit_steps, 10, 0.0

# the tokenizer: a loaded LLM's own (init_gpt; a run from the checkpoint of such a run reloads it from the source
# its meta names) with the recipe's special tokens appended, <|bos|> too where it has no BOS; else data.Tokenizer
loaded_gpt, tok, SPECIALS, gpt_source = None, None, None, ''
if init_gpt or run.meta.get('gpt_source'):  # (pretrained.py only then: a fork of this recipe runs without it)
    import pretrained
    loaded_gpt, tok, SPECIALS, gpt_source = pretrained.recipe_llm(init_gpt, run, ['<|image|>', '<|eos|>', '<|pad|>'],
                                                                  master)
if loaded_gpt is not None:  # the source's shape, each key printed where the config differs
    shape = {k: getattr(loaded_gpt.config, k) for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd')}
    globals().update(adopt_checkpoint_config(dict(config=shape), config, shape, verbose=master))
if tok is None:
    tok = Tokenizer(base=tokenizer)
IMAGE, EOS, PAD = tok['<|image|>'], tok['<|eos|>'], tok['<|pad|>']
BOS = tok.bos if tok.bos is not None else tok['<|bos|>']

# real sets are lists of {image, text, id}, read (and every image checked) before the model is built
real = {}
if dataset != 'synthetic':
    if train_data:
        real['train'] = ocr_read_jsonl(train_data)
    if val_data:
        reader = dict(jsonl=ocr_read_jsonl, fox=ocr_read_fox, omnidocbench=ocr_read_omnidocbench)[dataset]
        real['val'] = reader(val_data, image_root or None)
    if 'train' not in real and (overfit or not eval_only):  # (overfit trains and evaluates on train_data)
        raise InputError(f"dataset={dataset!r} needs train_data= (a JSONL of {{image, text}}) to train")

# -----------------------------------------------------------------------------
# model: from the checkpoint's meta, or from this config; stage 2 swaps in a stage-1 encoder (and maybe a GPT)

if init_sam or init_clip or init_encoder:  # (pretrained_vision only then: a fork of this recipe runs without it)
    from pretrained_vision import check_encoder_config, deepencoder_from_towers, is_foreign, load_vision
# a pretrained SAM is frozen from the start (the journal's fix for its collapsed from-scratch features)
pretrained_sam = bool(init_sam) or bool(init_encoder) and is_foreign(init_encoder)
sam_frozen = stage == 2 or (pretrained_sam if freeze_sam is None else freeze_sam)
# the glyph loss needs character positions: synthetic typewriter pages only, and a trainable SAM (stage 1)
use_glyphs = glyph_weight > 0 and dataset == 'synthetic' and pitch > 0 and stage == 1 and not sam_frozen
use_glyphs = use_glyphs and (not crop_mode or crop_size == image_size)  # (labels are cut per view of one size)


def max_vision_tokens():
    """The most vision tokens a page can take: one view, or in crop mode its largest grid of <= max_crops crops."""
    grids = [(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops]
    grids = grids if crop_mode else [(1, 1)]
    return max(vision_token_count(image_size, sam_patch, crop_size=crop_size, grid=g) for g in grids)

if run.ckpt_src:
    raw_model = model_from_meta(run.meta)
    if not run.resume:  # a checkpoint to start from or evaluate (a resume also loads the optimizer, below)
        load_checkpoint(run.ckpt_src, raw_model)
else:
    enc_cfg = EncoderConfig(image_size, sam_patch, sam_dim, sam_layers, sam_heads, sam_window, tuple(sam_global),
                            neck_dim, clip_layers, clip_heads, n_embd, center_vision,
                            OCR_GLYPH_CLASSES if use_glyphs else 0, OCR_TOKEN_SLOTS if use_glyphs and slot_weight > 0 else 0)
    gpt_cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                        sequence_len=max_vision_tokens() + 16 + max_text_tokens, image_token_id=IMAGE)
    if loaded_gpt is not None:  # (its shape is the config's now; a stage-1 or pretrained encoder is checked below)
        loaded_gpt.config.image_token_id = IMAGE
    raw_model = OCRModel(DeepEncoder(enc_cfg), loaded_gpt if loaded_gpt is not None else GPT(gpt_cfg))
shape_keys = dict(image_size=image_size, sam_patch=sam_patch, sam_dim=sam_dim, out_dim=n_embd)
if (init_sam or init_clip or init_encoder) and run.ckpt_src and master and not run.resume:
    print(f"init_encoder/init_sam/init_clip not loaded: the encoder is that of init_from={init_from}")
if (init_sam or init_clip) and not run.ckpt_src:
    if not (init_sam and init_clip) or init_encoder:
        raise InputError("init_sam and init_clip go together (SAM, then CLIP on its features), without init_encoder")
    raw_model.encoder = deepencoder_from_towers(init_sam, init_clip, raw_model.encoder.config)
    check_encoder_config(raw_model.encoder, f"init_sam {init_sam}", **shape_keys)
if init_encoder and not run.ckpt_src:
    if is_foreign(init_encoder):
        raw_model.encoder = load_vision(init_encoder)[0]
        check_encoder_config(raw_model.encoder, init_encoder, **shape_keys)
    else:
        raw_model.encoder = load_encoder(init_encoder, raw_model.gpt.config.n_embd)
enc, gpt = raw_model.encoder, raw_model.gpt
image_mean, image_std = enc.config.image_mean, enc.config.image_std  # what the encoder's weights expect
if isinstance(enc.center, BatchCenter) and not eval_only and not overfit and batch_size * run.world_size < 2:
    raise InputError("center_vision subtracts the batch's mean from every image: it needs a global batch of >= 2 "
                     "images (one image would be centred to zero); raise batch_size or pass --center_vision=False")
if crop_mode and crop_size % (4 * enc.config.sam_patch):
    raise InputError(f"crop_size {crop_size} must be a multiple of 4 * sam_patch ({4 * enc.config.sam_patch})")
if crop_mode and crop_size != enc.config.image_size and (isinstance(enc.center, BatchCenter)
                                                         or not enc.clip.config.pos_interpolate):
    raise InputError(f"crop_size {crop_size} != image_size {enc.config.image_size} needs an encoder whose CLIP "
                     f"resizes its positions (a pretrained one) and center_vision=False (its mean is per position)")
if sam_frozen:  # SAM (with neck, net_2, net_3) frozen, as DeepSeek-OCR stage 2
    enc.sam.requires_grad_(False)
    if enc.slot_head is not None:  # a stage-1 training aid, like SAM's glyph head
        enc.slot_head.requires_grad_(False)
raw_model.to(device)
set_checkpointing(raw_model, activation_checkpointing)
glyph_on = use_glyphs and enc.sam.glyph is not None  # (a checkpoint without the head trains without it)
q = enc.config.q
N_VISION = vision_token_count(enc.config.image_size, enc.config.sam_patch)
PAGE = (page_width or enc.config.image_size, page_height or enc.config.image_size)
TEXT = [dict(font_sizes=tuple(font_sizes), max_lines=max_lines, min_lines=min_lines, line_chars=line_chars, pitch=pitch,
             line_gap=line_gap)]  # how text is laid out: this, or one layout per entry of `layouts`
if LAYOUTS:
    TEXT = [dict(max_lines=n, min_lines=n, line_chars=m, **ocr_page_layout(PAGE, n, m)) for n, m in LAYOUTS]
    for t in TEXT:
        t['font_sizes'] = (t.pop('font_size'),)
n_params = sum(p.numel() for p in raw_model.parameters())
if master:
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    M = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in dict(enc=enc, sam=enc.sam, clip=enc.clip).items()}
    print(f"DeepEncoder {M['enc']:.2f}M (SAM {M['sam']:.2f}M, CLIP {M['clip']:.2f}M) + GPT "
          f"{gpt.num_params() / 1e6:.2f}M | trainable {n_train / 1e6:.2f}M | stage {stage} | {N_VISION} vision tokens "
          f"({q}x{q} + {q} newlines + 1{' + crops' if crop_mode else ''}) | out_dir {out_dir} | device {device} | "
          f"dtype {run.dtype}")

optimizer = configure_optimizers(raw_model, lr, weight_decay, device_type=run.device_type)
step, clock = 0, Clock(max_train_seconds, device=device)
if run.resume:  # weights, optimizer and RNG as they were when the checkpoint was written
    load_checkpoint(run.ckpt_src, raw_model, optimizer)
    set_rng_state(run.meta['rng'])
    print(f"resumed {out_dir} at step {run.meta['step']}")
if run.resume or eval_only:  # the checkpoint's step and training seconds (the budget and LR clock continue)
    step, clock.seconds = run.meta.get('step', 0), float(run.meta.get('train_seconds', 0.0))
# text-only batches skip the whole encoder, a glyph head left unused skips itself: only then must DDP look for
# unused parameters
model = wrap(raw_model, compile and not plan, run, find_unused_parameters=text_ratio > 0 or (not glyph_on and any(
    h is not None and h.weight.requires_grad for h in (enc.sam.glyph, enc.slot_head))))
planner = MemoryPlan(run, raw_model, optimizer, batch_size, grad_accum_steps, plan_gpu_gib,
                     kv_cache_bytes(raw_model.gpt.config, eval_batch, raw_model.gpt.config.sequence_len,
                                    2 if run.dtype == 'bfloat16' else 4),
                     activation_checkpointing) if plan else None

# -----------------------------------------------------------------------------
# data: synthetic pages are a pure function of (seed, split, index); real sets were read at setup
n_truncated = 0


def get_sample(split, index):
    if overfit:
        split, index = 'train', index % 10  # tier 1: the same 10 training pages, train and eval
    if dataset == 'synthetic':
        s = ocr_synthetic_sample(seed, split, index, image_size, noise=noise, styles=tuple(styles), paper=tuple(paper),
                                 ink=tuple(ink), glyph_patch=enc.config.sam_patch if glyph_on else 0, page=PAGE,
                                 **TEXT[index % len(TEXT)])
    else:
        item = real[split][index % len(real[split])]
        s = dict(image=load_image(item['image'], None if crop_mode else enc.config.image_size), text=item['text'],
                 id=item['id'])
    return ocr_tile_sample(s, enc.config.image_size, crop_size, min_crops, max_crops, image_mean) if crop_mode else s


def n_vision(sample):
    """The vision tokens of a page: N_VISION, or in crop mode its global view's plus its crops'."""
    return vision_token_count(enc.config.image_size, enc.config.sam_patch, crop_size=crop_size,
                              grid=sample.get('grid', (1, 1)))


def prompt_ids(n=N_VISION):
    return [BOS] + [IMAGE] * n + tok.encode(PROMPT)


def vision_input(samples):
    """The samples' images normalised on the device: (B, 3, S, S), or in crop mode TiledPages."""
    views = normalize(torch.stack([s['image'] for s in samples]), image_mean, image_std).to(device)
    if not crop_mode:
        return views
    crops = normalize(torch.cat([s['crops'] for s in samples]), image_mean, image_std).to(device)
    return TiledPages(views, crops, [s['grid'] for s in samples])


def make_batch(samples, text_only=False):
    """-> (idx, targets, images, aux). Loss only on the answer (and <|eos|>); right-padded with targets -1.
    aux: the samples' glyph and slot labels when they all have them, else None."""
    global n_truncated
    seqs, starts = [], []
    for s in samples:
        ans = tok.encode(s['text'])
        if len(ans) > max_text_tokens:
            ans, n_truncated = ans[:max_text_tokens], n_truncated + 1
        head = [BOS] if text_only else prompt_ids(n_vision(s))
        seqs.append(head + ans + [EOS])
        starts.append(len(head) - 1)  # the first position whose target is an answer token
    T = max(len(s) for s in seqs) - 1
    idx = torch.full((len(seqs), T), PAD, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, st:len(s) - 1] = torch.tensor(s[st + 1:])
    images = None if text_only else vision_input(samples)
    aux = None
    if not text_only and all('glyphs' in s for s in samples):  # (crop mode: every global view, then every crop)
        stack = (lambda v: np.concatenate([x[:1] for x in v] + [x[1:] for x in v])) if crop_mode else np.stack
        aux = {k: torch.from_numpy(stack([s[k] for s in samples])).to(device) for k in ('glyphs', 'slots')}
    return idx.to(device), targets.to(device), images, aux


def train_batch(step, micro=0):
    """Micro-batch `micro` of step `step`: the pages a batch of batch_size * grad_accum_steps would hold."""
    if overfit:
        return make_batch([get_sample('train', i) for i in range(10)])
    # text-only batches at rate text_ratio: a function of (seed, step), so every rank and micro-batch agrees
    text_only = text_ratio > 0 and np.random.default_rng([seed, 7, step]).random() < text_ratio
    indices = batch_indices(step * grad_accum_steps + micro, batch_size, run.rank, run.world_size)
    return make_batch([get_sample('train', i) for i in indices], text_only)

# -----------------------------------------------------------------------------
# checkpoint and eval: generated text (rollout), collapse monitor, per-sample table in overfit mode


def save(step):
    """The full checkpoint (resume, init_from, eval_only); stage 1 also writes the encoder alone, for stage 2."""
    meta = dict(recipe=RECIPE, step=step, config=config, rng=rng_state(), stage=stage, train_seconds=clock.seconds,
                encoder=asdict(enc.config), gpt=asdict(gpt.config))
    if gpt_source:  # what rebuilds the tokenizer (pretrained.own_tokenizer): the LLM's source, then these specials
        meta.update(gpt_source=gpt_source, specials=SPECIALS)
    save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer, meta=meta)
    if stage == 1:  # no gpt.* keys: stage 2 pairs it with a fresh or pretrained GPT
        save_checkpoint(os.path.join(out_dir, 'encoder'), enc,
                        meta=dict(kind='deepencoder', step=step, encoder=asdict(enc.config), config=config))


@torch.no_grad()
def generate_text(samples, max_new=None, use_cache=True, stop=True):
    """Batched greedy OCR of the samples' pages: vision embeddings computed once, prefilled once into the KV cache.
    Pages of different crop grids (prompt lengths) go in separate batches, their texts in the samples' order.
    (.tolist() waits for the device, so the bench's timings are complete.)"""
    groups = {}
    for i, s in enumerate(samples):
        groups.setdefault(n_vision(s), []).append(i)
    if len(groups) > 1:
        texts = [None] * len(samples)
        for members in groups.values():
            for i, t in zip(members, generate_text([samples[i] for i in members], max_new, use_cache, stop)[0]):
                texts[i] = t
        return texts, None
    with ctx:
        vision = enc(vision_input(samples))
    idx = torch.tensor([prompt_ids(n_vision(samples[0]))] * len(samples), device=device)
    with ctx:
        out = gpt.generate(idx, max_new or max_text_tokens + 1, vision_embeds=vision, eos_id=EOS if stop else None,
                           suppress_ids=[BOS, PAD], use_cache=use_cache)
    rows = [row[:row.index(EOS)] if EOS in row else row for row in out.tolist()]
    return [tok.decode(row) for row in rows], out


@torch.no_grad()
def collapse_monitor():
    """Over the probe set: the mean pairwise cosine of mean-pooled features at each stage, and shared_spread of
    the projected tokens (what the GPT reads)."""
    _, probe = ocr_probe_images(enc.config.image_size)
    with ctx:
        feats = enc.features(normalize(probe.to(device), image_mean, image_std))
    shared, spread = ocr_shared_spread(feats["proj"])
    return {f"cos_{k}": ocr_pairwise_cosine(v.mean(1)) for k, v in feats.items()}, \
        dict(proj_shared_rms=shared, proj_spread_rms=spread)


@torch.no_grad()
def per_sample_losses(samples):
    idx, targets, images, _ = make_batch(samples)
    with ctx:
        _, loss = gpt(idx, targets, enc(images), loss_reduction='none')
    loss = loss.view(targets.shape)
    return ((loss * (targets >= 0)).sum(1) / (targets >= 0).sum(1)).tolist()


@torch.no_grad()
def bench_generation():
    """Greedy generation of bench_tokens tokens for (up to) 8 held-out pages, with the KV cache and by full
    recomputation: tokens/s of each, the speedup, and whether the two outputs agree."""
    samples = [get_sample('val', i) for i in range(8)]
    samples = [s for s in samples if n_vision(s) == n_vision(samples[0])]  # one prompt length (crop grid)
    res = {}
    for name, cache in (('cache', True), ('recompute', False)):
        generate_text(samples[:2], 4, cache, stop=False)  # warm-up
        t0 = time.perf_counter()
        _, out = generate_text(samples, bench_tokens, cache, stop=False)
        res[name] = (out, len(samples) * bench_tokens / (time.perf_counter() - t0))
    return dict(gen_tok_s=res['cache'][1], gen_tok_s_recompute=res['recompute'][1],
                kv_speedup=res['cache'][1] / res['recompute'][1],
                kv_match=float(torch.equal(res['cache'][0], res['recompute'][0])))


@torch.no_grad()
def evaluate(step, final=False):
    """OCR of n_eval held-out pages, the collapse monitor, a PNG of the first 16; at the end also the generation
    bench. Every metric goes to results.json / evals.jsonl / wandb; the targets and DIAGNOSTICS are printed."""
    raw_model.eval()
    preds, gts, ids, images, text_tokens, vision_tokens = [], [], [], [], [], []
    n = min(n_eval, len(real['val'])) if 'val' in real and not overfit else n_eval
    for start in range(0, n, eval_batch):
        samples = [get_sample('val', i) for i in range(start, min(n, start + eval_batch))]
        texts, _ = generate_text(samples)
        preds += texts
        gts += [s['text'] for s in samples]
        text_tokens += [len(tok.encode(s['text'])) for s in samples]
        vision_tokens += [(n_vision(s), q * q + len(s.get('crops', ())) * (crop_size // enc.config.sam_patch // 4) ** 2)
                          for s in samples]
        ids += [s['id'] for s in samples]
        images += [s['image'] for s in samples[:max(0, 16 - len(images))]]
    metrics = ocr_metrics(preds, gts)
    metrics['distinct_outputs'] = len(set(preds)) / len(preds)  # a collapsed model answers every page alike
    # optical compression, the paper's way: text tokens (this run's tokenizer) per vision token, the vision tokens
    # counted as the grid's q*q (+ the crops'), without newlines and separator (vision_tokens counts those too)
    metrics.update(text_tokens=float(np.mean(text_tokens)), vision_tokens=float(np.mean([v for v, _ in vision_tokens])),
                   vision_tokens_grid=float(np.mean([g for _, g in vision_tokens])),
                   compression=float(np.mean([t / g for t, (_, g) in zip(text_tokens, vision_tokens)])))
    cos, spread = collapse_monitor()
    metrics.update(cos, collapse_cos=max(cos.values()), **spread)
    if overfit:
        losses = per_sample_losses([get_sample('train', i) for i in range(10)])
        print(f"{'id':<10} {'loss':>8} {'overlap':>8}  exact")
        for i, (p, g, l) in enumerate(zip(preds, gts, losses)):
            print(f"{ids[i]:<10} {l:8.4f} {100 * fox_word_metrics(p, g)['fox_precision']:7.0f}%  {'yes' if p == g else 'NO'}")
        metrics['exact_count'] = sum(p == g for p, g in zip(preds, gts))
    png = ocr_draw_predictions(os.path.join(out_dir, f"ocr_step{step:06d}.png"), images, preds[:len(images)],
                               gts[:len(images)])
    if final and bench_tokens:
        metrics.update(bench_generation())
    raw_model.train()
    note = []
    if metrics['collapse_cos'] > collapse_warn:
        note.append(f"WARNING: vision features collapsing (collapse_cos > {collapse_warn})")
    if n_truncated:
        note.append(f"{n_truncated} training targets longer than max_text_tokens={max_text_tokens} were cut")
    logger.eval(step, metrics, TARGETS, diagnostics=DIAGNOSTICS, note="; ".join(note), images={"predictions": png},
                n_eval=len(preds), train_seconds=clock.seconds, params=n_params, stage=stage,
                samples=[dict(id=i, pred=p, gt=g) for i, p, g in list(zip(ids, preds, gts))[:20]])


if eval_only:
    if master:  # reported at the checkpoint's step and training seconds
        evaluate(step, final=True)
    teardown(logger)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training

peak = run.matmul_peak() if master else None
loss_acc, aux_acc, n_acc, n_aux, logged_seconds = 0.0, {}, 0, 0, clock.seconds
raw_model.train()
while step < max_steps:
    clock.start()
    lr_now = get_lr(clock.lr_step(step, max_steps), max_steps, lr, warmup_steps, min_lr_frac)
    set_lr(optimizer, lr_now)
    batches = [train_batch(step, micro) for micro in range(grad_accum_steps)]
    # losses per target token (per labelled cell) of the whole step: every micro-batch on every rank (exact)
    n_targets = sum((targets != -1).sum() for _, targets, _, _ in batches)
    n_cells = {k: sum((b[3][k] != -1).sum() for b in batches) for k in batches[0][3] or {}}
    step_loss, tokens, n_images, n_crops = 0.0, 0, 0, 0
    for micro, (idx, targets, images, aux) in enumerate(batches):
        with sync_grads(model, micro, grad_accum_steps), plan_probe(planner):  # DDP all-reduces the gradients after the last only
            with ctx:
                _, loss_sum, *aux_sums = model(idx, targets, images, loss_reduction="sum", aux=aux)
            loss = global_mean(loss_sum, n_targets, device)
            total = loss
            for k, v in (aux_sums[0] if aux_sums else {}).items():
                aux_loss = global_mean(v, n_cells[k], device)
                total = total + (glyph_weight if k == 'glyphs' else slot_weight) * aux_loss
                aux_acc[k] = aux_acc.get(k, 0.0) + aux_loss.item()
            check_finite(total, step)
            total.backward()
        step_loss += loss.item()
        tokens += idx.numel() * run.world_size
        n_images += idx.shape[0] * run.world_size * (images is not None)
        n_crops += len(images.crops) * run.world_size if isinstance(images, TiledPages) else 0
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_acc, n_acc, n_aux = loss_acc + step_loss, n_acc + 1, n_aux + bool(aux_sums)  # (text-only: no aux)
    step += 1
    if planner and planner.done():
        break
    clock.stop()
    out_of_time = clock.spent()
    last = step == max_steps or out_of_time
    if step % log_interval == 0:
        loss_avg = mean_across_ranks(loss_acc / n_acc, device)  # the global batch's loss (every rank joins)
        if master:
            dt = (clock.seconds - logged_seconds) / n_acc
            aux_avg = {f"{k}_loss": v / n_aux for k, v in aux_acc.items()}  # rank 0's (diagnostics; loss is global)
            flops = train_flops(raw_model, n_images, tokens, glyph_on, n_crops, crop_size)
            print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens, flops, peak,
                           extra=" | ".join(f"{k} {v:.4f}" for k, v in aux_avg.items())))
            logger.log(dict(loss=loss_avg, lr=lr_now, **aux_avg), step)
        loss_acc, aux_acc, n_acc, n_aux, logged_seconds = 0.0, {}, 0, 0, clock.seconds
    if master and (step % eval_interval == 0 or last):
        save(step)  # checkpoint first: a failing eval never loses the training
        evaluate(step, final=last)
    if out_of_time:
        if master:
            print(f"stopping at step {step}/{max_steps}: max_train_seconds={max_train_seconds:.0f} reached")
        break

model = unwrap(model)  # drop the DDP wrapper before teardown: it holds the process group
teardown(logger, push_to_hub)
