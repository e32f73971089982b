# Seg-Gumbel on RefCOCO-style JSON (GPU scale). Write the JSON with the reader's format (data_seg.seg_read_refcoco):
# [{"image": "train2014/COCO_train2014_000000000009.jpg", "segmentation": [[x1, y1, ...]] | "mask": "m.png",
#   "sentences": ["the man on the left", ...]}, ...]   (a mask PNG's nonzero pixels are the region: 0/1 or 0/255)
# torchrun --standalone --nproc_per_node=8 train_seg_gumbel.py config/seg_refcoco.py
# needs (--plan=True, bf16, random weights of these shapes, 2026-12-06 CPU trace, stage A): peak ~9.8 GiB per
#   process at batch 32 (activations 6.8 GiB; ~5.1 GiB peak with --activation_checkpointing=True): one 24 GB+ GPU
dataset = "refcoco"
train_json = "data/refcoco/refcoco_train.json"
val_json = "data/refcoco/refcoco_val.json"
image_root = "data/coco"
image_size = 256
patch_size = 16
llm_grid = 8
max_caption_len = 48
vit_init = "hf:google/siglip-base-patch16-256"  # vision: SigLIP-B/16 at 256 px (16 x 16 patches), a standard VLM tower
vit_layers = 12
vit_embd = 768
vit_heads = 12
n_layer = 12
n_embd = 768
n_head = 12
dec_dim = 256
stage_a_steps = 20000
max_steps = 25000
lr = 3e-4
lr_b = 3e-5
warmup_steps = 1000
gumbel_top_k = 128
ema_decay = 0.999
log_interval = 50
eval_interval = 2000
n_eval = 2000
eval_batch_size = 128
dtype = "bfloat16"
compile = True
