# Pointing on real images: a PixMo-Points-like JSONL, one record per line:
#   {"image": "relative/or/absolute.jpg", "query": "the red mug", "points": [[x, y], ...]}   (pixels)
# Points are normalised with each image's own size; errors are reported in a 384-px-tall frame
# (width by the image's aspect ratio). GPU scale: python train_pointer.py config/pointer_jsonl.py
# (add --wandb_log=True to log to wandb; without a login it logs offline)
# needs (--plan=True, bf16, random weights of these shapes, 2026-12-06 CPU trace): peak ~11.7 GiB per process at
#   batch 32 (activations 10.6 GiB; ~2.6 GiB with --activation_checkpointing=True): one 24 GB+ GPU
dataset = "jsonl"
train_jsonl = "data/pointing/train.jsonl"
val_jsonl = "data/pointing/val.jsonl"
compile = True
img_size = 336
patch_size = 14               # 576 image tokens
vit_init = "hf:facebook/dinov2-small"  # vision: DINOv2-S (12 x 384, 6 heads), dense patch features made for localisation
vit_layers = 12
vit_embd = 384
vit_heads = 6
edge_channels = False         # the pretrained patch embedding reads RGB alone
coord_channels = False
n_layer = 12
n_embd = 768
n_head = 12
max_points = 10
max_query_len = 96
loss = "three_stage_cont"
window = 1                    # answer = soft-argmax over the 3x3 patches around the best one (dense_weight: no
                              #   labels in JSONL, so only the grounding / patch / coordinate losses train)
augment = True                # translate/scale/flip with the points moved along (a flip swaps left/right)
num_workers = 4               # image decoding + resizing in 4 worker processes while the GPU trains
lr = 3e-4
warmup_steps = 1000
max_steps = 50000
eval_interval = 2000
n_eval = 2000
n_train_eval = 500
log_interval = 50
wandb_run_name = "pointer-jsonl"
