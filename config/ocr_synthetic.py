# The default run (same values as train_ocr.py's defaults): synthetic typewriter-layout pages, 2-core CPU.
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
dataset = 'synthetic'      # 'synthetic' | 'jsonl' (train_data/val_data) | 'fox' | 'omnidocbench' (val_data)
train_data = ''
val_data = ''
image_root = ''            # folder of val_data's images ('' = the reader's default: fox and jsonl the file's folder,
                           #   omnidocbench images/ beside it)
image_size = 64
font_sizes = (10, 11)
max_lines = 3
noise = 0.04
paper = (200, 255)         # paper grey level range (0-255)
ink = (0, 90)              # ink grey level range
pitch = 7                  # > 0: typewriter layout, one character per `pitch` px cell (0: proportional)
line_gap = 16              # > 0: lines on a fixed grid `line_gap` px apart (0: random line positions)
max_text_tokens = 48       # longer targets are cut (and counted); also the generation budget
sam_patch = 4
sam_dim = 64
sam_layers = 2
sam_heads = 4
sam_window = 8             # window size in patches (0 = global everywhere)
sam_global = (1,)          # layers with global attention (SAM ViT-B: 2, 5, 8, 11)
neck_dim = 32              # SAM neck width; the convs give 2x then 4x this, which is CLIP's width
clip_layers = 1
clip_heads = 4
center_vision = True       # BatchCenter the projected vision tokens (the anti-collapse fix; False = DeepSeek's path)
glyph_weight = 1.0         # stage 1 on synthetic typewriter pages (pitch > 0): weight of a per-patch "which character
                           #   is here" cross-entropy on SAM's last block (0 = off; no labels on real data)
slot_weight = 1.0          # ... and of "which characters does this vision token cover, left to right" on the
                           #   projected tokens (3 slots per token; 0 = off)
n_layer = 3
n_head = 4
n_kv_head = 4
n_embd = 128
tokenizer = 'bytes'        # data.Tokenizer base: 'bytes' or a tiktoken name available offline
stage = 1                  # 1: everything trainable; 2: SAM frozen, encoder from init_encoder
init_encoder = ''          # encoder-only checkpoint dir (saved by stage 1 as <out_dir>/encoder)
init_gpt = ''              # GPT checkpoint dir; a vocab without <|image|> is grown by one row
text_ratio = 0.0           # share of text-only batches (DDP then needs find_unused_parameters)
overfit = False            # tier 1: train and evaluate on the first 10 training samples
overfit_steps = 300
max_steps = 9000           # ~85 ms/step on a quiet 2-core CPU (2 threads); max_train_seconds caps it
max_train_seconds = 750.0   # > 0: wall-clock budget of the training loop (0 = steps only)
batch_size = 16
lr = 2e-3
min_lr_frac = 0.05
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 25
eval_interval = 1500
n_eval = 200
eval_batch = 100
collapse_warn = 0.95
bench_tokens = 32          # KV-cache vs recomputation generation benchmark at the end (0 = skip)
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'ocr'
