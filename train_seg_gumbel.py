"""
Seg-Gumbel: referring segmentation + pseudo-Gumbel mask captioning (notes/seg_gumbel.md).

A small VLM (ViT -> projector -> GPT) with a light SAM-style mask decoder learns, in stage A,
  referring segmentation  <|bos|> <|image|>*N caption [SEG]           -> mask from the [SEG] hidden state
  region captioning       <|bos|> <|image|>*N <vp> <|image|>*K </vp>  -> caption <|eos|>
and then, in stage B, a six-step pseudo-Gumbel loop that trains segmentation *through* the model's own
captions: (1) an EMA teacher greedily captions the region (no grad); (2) 25% of those tokens are masked;
(3) the trainable model gives logits for them; (4) straight-through top-k Gumbel-softmax turns the logits into
one-hots whose backward is the soft sample's, and one-hots @ embedding matrix = text embeddings; (5) [SEG] (by
id) is appended and the mask predicted from those embeddings; (6) BCE + Dice, backprop into the trainable
model only, EMA update. The model, losses and eval live in data_seg.py.

    python train_seg_gumbel.py                              # synthetic default, CPU: 700 + 500 steps
    python train_seg_gumbel.py config/seg_refcoco.py        # RefCOCO-style JSON, GPU scale
    python train_seg_gumbel.py --init_from=resume           # continue the newest out/seg_gumbel-* run
    python train_seg_gumbel.py --init_gpt=hf:HuggingFaceTB/SmolLM2-135M   # from a pretrained LLM
"""
import os
import sys
from dataclasses import asdict, replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: spinning ones crawl on a shared CPU
import torch  # noqa: E402

from runtime import install_error_hook  # noqa: E402
install_error_hook()
from configurator import configure  # noqa: E402
from runtime import (Clock, Logger, check_finite, configure_optimizers, get_lr, grad_norm, log_line,  # noqa: E402
                     mean_across_ranks, set_lr, setup, sync_grads, teardown, wrap,
                     MemoryPlan, kv_cache_bytes, plan_probe)
from checkpoint import (adopt_checkpoint_config, all_rng_states, load_checkpoint, save_checkpoint,  # noqa: E402
                        set_rng_state, unwrap)
from data import batch_indices  # noqa: E402
from model import InputError, gpt_flops_per_token, set_checkpointing  # noqa: E402
from data_seg import (SEG_LLM_SPECIALS, SEG_SPECIALS, SegData, SegVocab, seg_build_model,  # noqa: E402
                      seg_configs, seg_configs_from_meta, seg_ema_update, seg_evaluate, seg_stage_b_noise,
                      seg_step_counts, seg_teacher_captions)

# -----------------------------------------------------------------------------
# config (every key can be set from config/*.py or --key=value)
out_dir = ""
init_from = "scratch"        # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = "auto"
dtype = "auto"
compile = False
torch_threads = 0            # 0 = auto (runtime.pick_threads: OMP_NUM_THREADS, else the cores per process)
# data
dataset = "synthetic"        # 'synthetic' | 'refcoco'
train_json = ""              # RefCOCO-style JSON (dataset='refcoco')
val_json = ""
image_root = ""              # relative image/mask paths resolve here ('' = the JSON's folder)
image_size = 32
max_caption_len = 16         # tokens (bytes); longer referring sentences are cut
vp_grid = 16                 # the visual prompt: region mask pooled to vp_grid x vp_grid, K = cells > 0.5
captioned_pool = 3000        # synthetic: > 0 = stage A draws from only this many captioned training scenes (as
                             # RefCOCO is small) while stage B draws fresh scenes and uses their masks only (as
                             # large mask sets come without captions); 0 = both stages draw fresh scenes
# model
patch_size = 4
llm_grid = 4                 # the GPT sees the ViT features average-pooled to llm_grid x llm_grid tokens
vit_layers = 2
vit_embd = 128
vit_heads = 4
vit_init = ""                # a transformers vision encoder (dir or hf:owner/name; CLIP, DINOv2, SigLIP): its weights
                             #   and normalisation; patch_size and vit_* must agree with it
init_gpt = ""                # a pretrained LLM (dir or hf:owner/name: this repo's GPT, nanochat, Llama family): its
                             #   weights, shape (n_layer, n_embd, n_head, n_kv_head) and tokenizer, the recipe's
                             #   special tokens appended; '' = a GPT from scratch
n_layer = 3
n_embd = 128
n_head = 4
n_kv_head = 4
dec_dim = 64                 # mask decoder width
# schedule: stage A for stage_a_steps, then stage B until max_steps
stage_a_steps = 700
max_steps = 1200
max_train_seconds = 0.0      # > 0: an opt-in wall-clock cap on training seconds (0: the run is step-exact)
batch_size = 32              # per rank and micro-batch
grad_accum_steps = 1         # micro-batches per step: a step trains on batch_size * grad_accum_steps samples per rank
activation_checkpointing = False  # recompute each ViT / GPT block in the backward: less memory, ~1/3 more compute
plan = False                 # print the memory plan (two traced steps: runtime.MemoryPlan), then stop
plan_gpu_gib = 0.0           # the GPU size the plan fits the batch to (0: the visible GPU, else 80 GiB)
lr = 2e-3
lr_b = 5e-4                  # stage B learning rate (its own cosine from lr_b)
min_lr_frac = 0.1
warmup_steps = 50
weight_decay = 0.05
grad_clip = 1.0
caption_weight = 1.0         # stage A: mask loss + caption_weight * caption cross-entropy
# stage B (pseudo-Gumbel)
gumbel_tau = 0.7
gumbel_top_k = 16            # 0 = the full vocabulary
mask_ratio = 0.25
ema_decay = 0.99
distill_weight = 1.0         # + CE of the trainable logits on the teacher's pseudo tokens (0 = the bare six steps)
grad_norm_interval = 10      # log the text-embedding gradient norm every N stage-B steps
# eval / logging
log_interval = 25
eval_interval = 350          # also at the end of stage A (the reference stage B is judged against) and the end
n_eval = 256
eval_batch_size = 64
n_vis = 6
wandb_log = False
wandb_project = "vlm"
wandb_run_name = "seg_gumbel"
push_to_hub = ""             # 'owner/name': upload the final checkpoint + a model card (needs a Hub login)
# -----------------------------------------------------------------------------
config = configure(globals())

RECIPE = "seg_gumbel"
# checked on the final (stage-B) eval: its gIoU >= 0.85, its drop from the stage-A gIoU <= 0.02, and a cycle-IoU
# gain over stage A (the stage-A gIoU itself is reported as giou_stage_a, not checked)
TARGETS = {"giou": (">=", 0.85), "giou_drop": ("<=", 0.02), "cycle_iou_gain": (">", 0.0)}
# the model's shape: a run from a checkpoint takes these from it, and says so (image_size: the ViT's position table)
MODEL_KEYS = ("image_size", "patch_size", "llm_grid", "vit_layers", "vit_embd", "vit_heads", "n_layer", "n_embd",
              "n_head", "n_kv_head", "dec_dim")

# settings that would fail deep inside training (or train on nothing) fail here, in one line, before any file
if not 0 < stage_a_steps <= max_steps:
    raise InputError(f"need 0 < stage_a_steps ({stage_a_steps}) <= max_steps ({max_steps})")
for _k in ("max_caption_len", "vp_grid", "grad_norm_interval"):  # (the shared counts: configurator.POSITIVE_KEYS)
    if config[_k] < 1:
        raise InputError(f"{_k} must be >= 1, got {config[_k]}")
if gumbel_tau <= 0:
    raise InputError(f"gumbel_tau (the Gumbel-softmax temperature) must be > 0, got {gumbel_tau}")
if not 0 <= mask_ratio <= 1 or not 0 <= ema_decay <= 1:
    raise InputError(f"mask_ratio ({mask_ratio}) and ema_decay ({ema_decay}) must lie in [0, 1]")
data = SegData(dataset, seed, image_size, max_caption_len, vp_grid, captioned_pool, train_json, val_json, image_root)
if dataset == "refcoco":
    data.records("train"), data.records("val")  # a missing/bad JSON fails before anything is written

run = setup(config, RECIPE, MODEL_KEYS)  # threads, DDP, autocast, seed + rank, run dir, the checkpoint's shape
globals().update(config)
device, master, ctx = run.device, run.master, run.ctx
data.image_size = image_size  # a checkpoint's image size wins (its ViT position table)
logger = Logger(run, RECIPE, config, wandb_log, wandb_project, wandb_run_name)

# the tokenizer: a loaded LLM's own (init_gpt; a run from a checkpoint of such a run reloads it from the source its
# meta names) with the recipe's special tokens appended; else data.Tokenizer (SEG_TOK)
llm, gpt_source = None, run.meta.get("gpt_source", "") if run.ckpt_src else init_gpt
if gpt_source:  # (pretrained.py only then: a fork of this recipe runs without it)
    import pretrained
    if run.ckpt_src:
        data.tok = pretrained.own_tokenizer(run.meta)
    else:
        llm, data.tok, _ = pretrained.load_gpt(init_gpt)
        pretrained.add_special_tokens(llm, data.tok, SEG_LLM_SPECIALS)
        GPT_SHAPE = ("n_layer", "n_embd", "n_head", "n_kv_head")  # the source's, printed where they differ
        adopt_checkpoint_config(dict(config={k: getattr(llm.config, k) for k in GPT_SHAPE}), config, GPT_SHAPE, master)
        globals().update({k: config[k] for k in GPT_SHAPE})

# -----------------------------------------------------------------------------
# model: {student, teacher}; the optimizer trains the student, the teacher follows it by EMA in stage B
if run.ckpt_src:
    vit_cfg, gpt_cfg = seg_configs_from_meta(run.meta)
else:
    vit_cfg, gpt_cfg = seg_configs(image_size, patch_size, llm_grid, vp_grid, max_caption_len, vit_layers, vit_embd,
                                   vit_heads, n_layer, n_embd, n_head, n_kv_head)
if llm:  # the loaded LLM's own config (its vocabulary grown by the specials), its image token the recipe's
    gpt_cfg = replace(llm.config, image_token_id=data.tok["<|image|>"])
vit_src = None
if vit_init and not run.ckpt_src:  # the source's shapes at this run's image size (pretrained_vision only then)
    from pretrained_vision import load_vision, recipe_vit_config
    vit_src = load_vision(vit_init)
    vit_cfg = recipe_vit_config(vit_src[1], vit_init, image_size, patch_size, vit_embd, vit_layers, vit_heads)
vocab = SegVocab(data.tok, gpt_cfg.vocab_size)
if data.tok.vocab_size > gpt_cfg.vocab_size:
    raise InputError(f"the tokenizer has {data.tok.vocab_size} ids but the GPT only {gpt_cfg.vocab_size} rows")
raw_model = seg_build_model(vit_cfg, gpt_cfg, dec_dim, llm_grid, fresh=not run.ckpt_src, vocab=vocab).to(device)
for m in raw_model.values():  # student and teacher start from the same pretrained LLM / encoder
    if llm:
        m.gpt.load_state_dict(llm.state_dict())
    if vit_src:
        m.vit.load_state_dict(vit_src[0].state_dict())
llm = vit_src = None  # the weights now live in raw_model
set_checkpointing(raw_model, activation_checkpointing)
student, teacher = raw_model["student"], raw_model["teacher"]
teacher.requires_grad_(False)
teacher.eval()
optimizer = configure_optimizers(student, lr, weight_decay, device_type=run.device_type)
n_params = sum(p.numel() for p in student.parameters())
# the MFU counts the GPT's FLOPs on its positions (the ViT and mask decoder are left out: a lower bound)
gpt_flops = gpt_flops_per_token(gpt_cfg, student.gpt.num_params(exclude_embedding=True))
stage_b_args = dict(max_len=max_caption_len, mask_ratio=mask_ratio, tau=gumbel_tau, top_k=gumbel_top_k,
                    distill_weight=distill_weight)  # the teacher's captions and the random draws come per micro-batch

step, clock = 0, Clock(max_train_seconds, device=device)
stage_a, skipped, skipped_steps = {}, 0, 0  # the stage-A eval's metrics; empty-mask samples, skipped steps
if run.ckpt_src:
    meta = load_checkpoint(run.ckpt_src, raw_model, optimizer if run.resume else None)
    if run.resume or eval_only:
        step, clock.seconds, stage_a = meta["step"], meta.get("train_seconds", 0.0), meta.get("stage_a", {})
        skipped, skipped_steps = meta.get("skipped", 0), meta.get("skipped_steps", 0)
    if run.resume:
        set_rng_state(meta["rng"])  # every rank's own stream: the Gumbel noise and masking differ by rank
        print(f"resumed {run.ckpt_src} at step {step}")
model = wrap(student, compile and not plan, run)
planner = MemoryPlan(run, raw_model, optimizer, batch_size, grad_accum_steps, plan_gpu_gib,
                     kv_cache_bytes(student.gpt.config, eval_batch_size, student.gpt.config.sequence_len,
                                    2 if run.dtype == 'bfloat16' else 4),
                     activation_checkpointing) if plan else None
if master:
    os.makedirs(run.out_dir, exist_ok=True)
    print(f"run dir {run.out_dir} | {n_params / 1e6:.2f}M params | device {device} {run.dtype} | "
          f"stage A {stage_a_steps} steps, stage B {max_steps - stage_a_steps} steps")


# what rebuilds the tokenizer (pretrained.own_tokenizer): data.Tokenizer's specials, or the LLM's source and then these
tokenizer_meta = dict(gpt_source=gpt_source, specials=SEG_LLM_SPECIALS) if gpt_source else dict(specials=list(SEG_SPECIALS))


def save(step, rngs):
    save_checkpoint(os.path.join(run.out_dir, "ckpt"), raw_model, optimizer, meta=dict(
        recipe=RECIPE, step=step, config=config, rng=rngs, vit=asdict(vit_cfg), gpt=asdict(gpt_cfg),
        dec_dim=dec_dim, llm_grid=llm_grid, stage_a=stage_a, skipped=skipped, skipped_steps=skipped_steps,
        train_seconds=clock.seconds, **tokenizer_meta))


def evaluate(step):
    """Rollout metrics on n_eval held-out samples. The first eval at or after the end of stage A is the reference
    stage B is judged against: giou_drop and cycle_iou_gain compare with it."""
    vis = os.path.join(run.out_dir, f"samples_step{step:05d}.png")
    metrics = seg_evaluate(student, data, n_eval, eval_batch_size, device, ctx, n_vis, vis)
    if step >= stage_a_steps and not stage_a:
        stage_a.update(giou=metrics["giou"], cycle_iou=metrics["cycle_iou"], ciou=metrics["ciou"],
                       caption_acc=metrics["caption_acc"])
    if stage_a and step > stage_a_steps:
        metrics.update(giou_stage_a=stage_a["giou"], cycle_iou_stage_a=stage_a["cycle_iou"],
                       giou_drop=stage_a["giou"] - metrics["giou"],
                       cycle_iou_gain=metrics["cycle_iou"] - stage_a["cycle_iou"])
    metrics["skipped"], metrics["skipped_steps"] = skipped, skipped_steps
    stage = "A" if step <= stage_a_steps else "B"
    return logger.eval(step, metrics, TARGETS, note=f"stage {stage}", n_eval=n_eval,
                       diagnostics=("cycle_iou", "giou_stage_a", "cycle_iou_stage_a", "ciou", "caption_acc",
                                    "skipped_steps"),
                       images={"samples": vis if os.path.exists(vis) else None},
                       stage=stage, stage_a=stage_a, train_seconds=round(clock.seconds, 1), params=n_params)


if eval_only:
    if master:
        evaluate(step)
    teardown(logger)
    sys.exit(0)

# -----------------------------------------------------------------------------
# training: stage A (segmentation + captioning) until stage_a_steps, then stage B (pseudo-Gumbel)
peak = run.matmul_peak() if master else None
sec0, step0, n_tokens = clock.seconds, step, 0  # the log interval's start: seconds, step, GPT positions
grads = None  # (step, text-emb, decoder, projector) gradient norms at their last measurement
while step < max_steps:
    clock.start()
    if step == stage_a_steps:  # stage B starts: the teacher is the stage A model
        teacher.load_state_dict(student.state_dict())
    in_b = step >= stage_a_steps  # by step, whatever the clock: a time cap never moves the stage boundary
    sched = clock.lr_step(step, max_steps)  # = step unless max_train_seconds is set
    lr_now = (get_lr(sched - stage_a_steps, max_steps - stage_a_steps, lr_b, 0, min_lr_frac) if in_b
              else get_lr(sched, stage_a_steps, lr, warmup_steps, min_lr_frac))
    set_lr(optimizer, lr_now)
    # micro-batch m of the step holds the samples a batch of batch_size * grad_accum_steps would
    stage, k = "B" if in_b else "A", grad_accum_steps
    micro = [data.batch("train", batch_indices(step * k + m, batch_size, run.rank, run.world_size), device, stage)
             for m in range(k)]
    if in_b:  # step (1) for every micro-batch first: the pseudo captions' lengths are a denominator of the step
        with ctx:
            for b in micro:
                b["pseudo"] = seg_teacher_captions(teacher, b["images"], b["cells"], max_caption_len)
    counts = seg_step_counts(micro, stage)  # this rank's; the losses' global_mean adds the other ranks'
    skipped += sum(len(b["masks"]) for b in micro) - counts["seg"]  # samples with an empty mask
    # no sample with a non-empty mask on any rank: a counted skip, never a zero loss (a micro-batch or rank without
    # one still runs: its mask loss adds 0, its graph and DDP's gradient reduction intact); eval, checkpoint, log run
    skip = mean_across_ranks(counts["seg"], device) == 0
    if skip:
        skipped_steps += 1
        if master:
            print(f"step {step + 1}: batch skipped (no sample with a non-empty mask on any rank); "
                  f"{skipped_steps} steps skipped so far")
    else:
        loss, parts = 0.0, {}  # the step's loss: the micro-batches' shares summed
        for m, b in enumerate(micro):
            with sync_grads(model, m, k), plan_probe(planner):  # DDP reduces the gradients once, in the last backward
                with ctx:
                    if in_b:
                        noise = seg_stage_b_noise(seed, b["index"], max_caption_len + 1, student.gpt.config.vocab_size,
                                                  device)
                        share, stats, text = model("stage_b", images=b["images"], masks=b["masks"], cells=b["cells"],
                                                   pseudo=b["pseudo"], noise=noise, counts=counts, **stage_b_args)
                    else:
                        share, stats = model("stage_a", images=b["images"], masks=b["masks"], cells=b["cells"],
                                             caption_ids=b["caption_ids"], caption_weight=caption_weight, counts=counts)
                check_finite(share, step)
                share.backward()
            loss = loss + share.detach()
            n_tokens += stats["tokens"]
            parts = {n: parts.get(n, 0.0) + stats[n] / (k if n == "pseudo_len" else 1)
                     for n in ("seg", "distill", "pseudo_len", "ce") if n in stats}
        if in_b and (step - stage_a_steps) % grad_norm_interval == 0:
            if text.grad is None or float(text.grad.norm()) == 0.0:
                raise RuntimeError(f"step {step}: no gradient reached the text embeddings (the Gumbel path is cut)")
            grads = (step + 1, float(text.grad.norm()), grad_norm(student.decoder), grad_norm(student.proj))
            logger.log(dict(text_emb_grad=grads[1], decoder_grad=grads[2], proj_grad=grads[3]), step + 1)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        if in_b:
            seg_ema_update(teacher, student, ema_decay)
        optimizer.zero_grad(set_to_none=True)
    step += 1
    if planner and planner.done():
        break
    clock.stop()
    spent = clock.spent()  # every rank the same answer
    last = step == max_steps or spent
    if not skip and (step % log_interval == 0 or last):
        loss_avg = mean_across_ranks(loss.item(), device)  # the global batch's loss (every rank joins)
        dt, tokens = (clock.seconds - sec0) / (step - step0), n_tokens / (step - step0)  # tokens: this rank's
        sec0, step0, n_tokens = clock.seconds, step, 0                                    # GPT positions per step
        if master:
            extra = (f"stage B | seg {parts['seg']:.4f} | distill {parts['distill']:.3f} | "
                     f"pseudo len {parts['pseudo_len']:.1f}" if in_b
                     else f"stage A | seg {parts['seg']:.3f} | ce {parts['ce']:.3f}")
            if in_b and grads:  # measured every grad_norm_interval steps: printed with the step it is from
                extra += f" | text-emb grad {grads[1]:.3g} @ step {grads[0]} (decoder {grads[2]:.3g}, proj {grads[3]:.3g})"
            print(log_line(step, max_steps, loss_avg, lr_now, dt, tokens, gpt_flops * tokens, peak, extra=extra))
            logger.log(dict(loss=loss_avg, lr=lr_now, seg=parts["seg"]), step)
    if step % eval_interval == 0 or step == stage_a_steps or last:
        rngs = all_rng_states()  # every rank's RNG, gathered by all (a collective), saved by rank 0
        if master:
            save(step, rngs)  # checkpoint first: a failing eval never loses training
            evaluate(step)
            if step == stage_a_steps:
                save(step, rngs)  # again, now holding the stage-A reference a resumed stage B is judged against
    if spent and step < max_steps:
        if master:
            print(f"stopped at step {step}: max_train_seconds={max_train_seconds:g} of training spent")
        break
if master and (skipped or skipped_steps):
    print(f"done: {skipped_steps} steps skipped, {skipped} samples with an empty mask (rank 0's)")
model = unwrap(model)  # drop the DDP wrapper before teardown: it holds the process group
teardown(logger, push_to_hub)
