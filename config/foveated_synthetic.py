# The default: synthetic "track" videos on a 2-core CPU (the same values as the defaults in train_foveated.py).
out_dir = ''
init_from = 'scratch'      # 'scratch' | 'resume' | checkpoint dir | 'hf:owner/name'
eval_only = False
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
# data
task = 'track'             # 'track' (small mover among distractors) | 'static_large' (control) | 'folder'
data_dir = ''              # task='folder': captions.json + clip.npy / clip/ frames
n_frames = 8
image_size = 32
n_distractors = 3
noise = 0.04
cue_frames = 3             # the target is outlined in the first frames only (3: its velocity shows, 3-5 px)
p_change = 0.1             # per-frame chance that each sprite switches colour (the fine path's irreducible error)
center_start = True        # track: the target starts mid-frame, then moves with momentum
specks = 1                 # flickering random pixels per frame (unpredictable clutter)
jitter = 0.5               # std (px/frame, per axis) of each sprite's random velocity kick per frame (0: pure momentum,
                           # where dead reckoning from the cue predicts nearly as well as looking; README, Foveated)
latent_encoder = 'fixed'   # 'fixed' (seeded random high-pass filters) | path/to/taesd_encoder.safetensors
latent_target = 'target_layer'  # 'target_layer': frame t+1 with only the target drawn, at a spatial grid (where
                           # the tracked object will be and how it looks; synthetic only) | 'delta': z(t+1) - z(frame 0)
                           # of the whole frame | 'frame': z(t+1) of the whole frame
latent_channels = 8
latent_grid = 2            # latent pooled to grid x grid cells (1: position-invariant)
# encoder: shared ViT, per-layer patch K/V cached, queries read it
patch_size = 4             # 8x8 patches of 4 px: a read can isolate the 4 px target
vit_layers = 3
vit_heads = 4
vit_width = 64
coord_channels = True      # append fixed sin/cos x,y channels so keys carry position from step 0
query_mode = 'deep'        # 'deep' (read at every layer) | 'shallow' (read the last layer only)
attn_temperature = 0.1     # divides the query->patch logits (< 1 sharper)
query_dim = 32
glimpse = False            # True: the last 64 numbers of a query are a location map over the 8 x 8 patches
freeze_vit = False
vit_init = ''              # checkpoint dir whose model.safetensors holds 'vit.*' weights (a pretrained ViT)
# LLM
n_layer = 2
n_head = 4
n_embd = 128
fine_proj = True           # True: the fine reads enter the GPT through their own Projector
read_weight = 1.0          # > 0: each read of frame t must also give frame t's latent (one head, both paths)
read_skip = True           # True: predict frame t+1 as read_head(read of frame t) + the GPT's change
look_weight = 1.0          # training only: -log(attention mass on the target's patches), both paths (eval: no positions)
oracle_look = False        # DIAGNOSTIC: the fine reads get the target's true patches as a location prior (upper bound)
recurrent = False          # True: frame t's fine query from the GPT state after the fine reads of frames < t
n_passes = 1               # fine passes (each re-predicts the queries from the previous fine pass)
detach_coarse = True       # the fine loss never flows back through the coarse pass to q_static / proj (the
                           # shared ViT, GPT and heads still learn from both losses)
mode_weights = (0.6, 0.2, 0.2)   # video-only, text-conditioned, captioning; drawn per batch
caption_tokens = 40        # caption budget (longer captions are an error)
n_caption_eval = 64        # held-out videos captioned (generated) at each eval
# training
max_steps = 4000
max_train_seconds = 600.0   # > 0: wall-clock budget of the training loop (0 = steps only)
batch_size = 16
lr = 2e-3
min_lr_frac = 0.1
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
log_interval = 50
eval_interval = 1000
n_eval = 256
eval_batch = 64
n_vis = 3                  # videos drawn in the attention strip PNG
wandb_log = False
wandb_project = 'nano-vlm'
wandb_run_name = 'foveated'
