# LaneLM on the real CULane benchmark (GPU scale); only what differs from train_lanelm.py's defaults.
# Layout expected under data_root (CULane as distributed):
#   list/train_gt.txt  list/test.txt  list/test_split/test<k>_<scenario>.txt (optional: per-scenario F1)
#   driver_*/<video>/<frame>.jpg with <frame>.lines.txt beside it (one lane per line: x1 y1 x2 y2 ...)
# python train_lanelm.py config/lanelm_culane.py --data_root=/data/culane
# torchrun --standalone --nproc_per_node=8 train_lanelm.py config/lanelm_culane.py --data_root=/data/culane
# Labels stay in CULane's 1640x590 frame (the official metric draws 30 px lanes there); images are resized to
# 800x288, so P5 (stride 16) is 50x18 = 900 vision tokens. CULane has up to 4 lanes: 4 lane ids.
# Eval: F1@50 (the target), F1@75, mF1 and per-scenario F1@50 on list/test.txt (34,680 images).
dataset = 'culane'
train_labels = 'list/train_gt.txt'
val_labels = 'list/test.txt'
img_w = 800
img_h = 288
h_step = 10                  # the ROW grid 40, 50, ... 590: CULane's rows (56 rows)
conv_width = 48
conv_norm = 'batch'
n_layer = 8
n_head = 8
n_embd = 512
max_steps = 60000
batch_size = 32
lr = 6e-4
min_lr_frac = 0.01
warmup_steps = 1000
weight_decay = 0.1
eval_interval = 5000
n_eval = 34680
n_eval_tf = 256
eval_batch = 64
compile = True
wandb_run_name = 'lanelm-culane'
