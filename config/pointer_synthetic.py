# The default: synthetic referring scenes on a CPU (the same values as train_pointer.py's defaults).
# python train_pointer.py config/pointer_synthetic.py
out_dir = ""                 # '' -> out/pointer-<timestamp>
init_from = "scratch"        # scratch | resume | <checkpoint dir> | hf:owner/name
eval_only = False
seed = 1337
device = "auto"
dtype = "auto"
compile = False
dataset = "synthetic"        # synthetic | jsonl
train_jsonl = ""             # jsonl: {"image": path, "query": str, "points": [[x, y], ...]} per line
val_jsonl = ""
img_size = 96                # rendered/resized image side (px); errors are still measured at 384 px
edge_channels = True         # + |Sobel| in 4 orientations as input channels (the ViT sees shape)
patch_size = 12
stem = "patch"               # patch: linear patch embedding | conv: 3 strided convs (measured slower to learn)
vit_layers = 4
vit_embd = 128
vit_heads = 4
n_layer = 3                  # GPT
n_embd = 128
n_head = 4
n_kv_head = 4
image_attention = "causal"   # causal | bidirectional: the image tokens see each other both ways (a prefix-LM)
input_norm = True            # RMS-normalise the GPT's input embeddings before its first block
head_mode = "attend"         # attend: point token attends over image tokens (soft-argmax + offsets) plus
                             #   x_head/y_head refinement; mlp: x_head/y_head of the hidden state alone
direction_bias = True        # attend: a learned linear ramp over patch positions in the point token's scores
max_points = 3               # longest point sequence (multi-target queries)
max_query_len = 48           # query tokens kept
word_tokens = True           # one token per word of the synthetic grammar (unknown words: bytes)
loss = "three_stage"         # three_stage | three_stage_cont | l1 | smooth_l1
done_weight = 0.2            # weight of the done BCE
patch_weight = 1.0           # attend mode: cross-entropy of the point token's attention over image patches
                             #   toward the patch holding the target (0 = off)
mask_weight = 1.0            # attend mode: BCE of a per-image-token "belongs to a referred object" logit (a
                             #   dense grounding label: image tokens read the query, which comes first)
dense_weight = 20.0          # dense scene parsing of EVERY object (synthetic only): per-patch colour/shape/size
                             #   classes on the ViT features + per-patch offset to its object's centre (attend);
                             #   weighted up because shape is what the ViT learns slowest (1 -> 20: <= 5 px 57% -> 79%)
parse_object_weight = 5.0    # dense parsing: a patch an object covers weighs 5 background patches
window = 0                   # the best patch's centre + offset alone (1: soft-argmax over its 3x3; -1 = global)
train_cluster = 0.3          # training objects placed next to an earlier one with this probability (more overlap)
multi_weight = 0.25          # share of "every ..." queries among training queries
curriculum_steps = 150       # > 0: attribute-only queries (no relations / "every") before this step
augment = False              # translate/scale/flip (synthetic scenes are infinite, so off by default)
max_steps = 2200             # 300-460 ms/step with Muon on a 2-core AMD EPYC (1,000-1,750 steps in 540 s); the time caps it
max_train_seconds = 540.0         # > 0: stop training after this many seconds (then eval); LR decays on time too
batch_size = 32
num_workers = 0              # > 0: worker processes build batches ahead (slower on 2 cores: they share them)
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.05
optim = "muon"               # muon: hidden matrices take Muon (same lr), the rest AdamW | adamw
grad_clip = 1.0
log_interval = 25
eval_interval = 250
n_eval = 500                 # held-out single-target queries
n_eval_multi = 200           # held-out "every ..." queries, rolled out until done
n_train_eval = 200           # training queries evaluated for the train/val gap
patience = 5                 # early stopping: evals without a better val mean pixel error
n_vis = 8
wandb_log = False
wandb_project = "vlm-pointer"
wandb_run_name = "pointer"
