# LaneLM on the real TuSimple benchmark (GPU scale); only what differs from train_lanelm.py's defaults.
# Layout expected under data_root:
#   clips/...  label_data_0313.json  label_data_0531.json  label_data_0601.json  test_label.json
# python train_lanelm.py config/lanelm_tusimple.py --data_root=/data/tusimple
# torchrun --standalone --nproc_per_node=8 train_lanelm.py config/lanelm_tusimple.py --data_root=/data/tusimple
# Labels stay in TuSimple's 1280x720 frame (the official 20 px threshold); images are resized to 640x368,
# so P5 (stride 16) is 40x23 = 920 vision tokens. TuSimple has up to 5 lanes: 6 lane ids.
# needs (--plan=True, bf16, 2026-12-06 CPU trace): peak ~9.8 GiB per process at batch 32 (activations 9.4 GiB;
#   ~2.9 GiB with --activation_checkpointing=True) + eval KV cache <= 6.1 GiB: one 24 GB+ GPU
dataset = 'tusimple'
img_w = 640
img_h = 368
max_lanes = 6
h_step = 10                  # the ROW grid 160, 170, ... 710: TuSimple's rows (clips 0313 label 240..710)
conv_width = 48
conv_norm = 'batch'
n_layer = 8
n_head = 8
n_embd = 512
max_steps = 30000
batch_size = 32
lr = 6e-4
min_lr_frac = 0.01
warmup_steps = 1000
weight_decay = 0.1
eval_interval = 2000
n_eval = 2782
n_eval_tf = 256
eval_batch = 64
compile = True
wandb_run_name = 'lanelm-tusimple'
