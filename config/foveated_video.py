# Foveated VLM at GPU scale on real clips: python train_foveated.py config/foveated_video.py
# data_dir holds captions.json {clip: caption} and clip.npy (T, H, W, 3) or clip/ frame folders
# (every 10th clip by name is held out). Latents: TAESD's encoder from safetensors
# (madebyollin/taesd taesd_encoder.safetensors or diffusers AutoencoderTiny weights).
# needs (--plan=True, bf16, random weights of these shapes, 2026-12-06 CPU trace): peak ~3.6 GiB per process at
#   batch 8 (activations 1.7 GiB; block checkpointing does not shrink them here) + eval KV cache <= 5.6 GiB: any 24 GB+ GPU
task = 'folder'
data_dir = 'data/clips'
n_frames = 16
image_size = 224
latent_encoder = 'weights/taesd_encoder.safetensors'
latent_target = 'delta'    # real clips have no target layer: the whole frame's change since frame 0
latent_grid = 4
patch_size = 14            # DINOv2-S's shapes: 224 px = 16 x 16 patches, 12 layers x 6 heads, 384 wide
vit_layers = 12
vit_heads = 6
vit_width = 384
coord_channels = False     # a pretrained ViT takes plain RGB
vit_init = 'hf:facebook/dinov2-small'  # vision: DINOv2-S frozen, deep queries: the foveated journal's own setup
freeze_vit = True
query_dim = 128
init_gpt = 'hf:HuggingFaceTB/SmolLM2-135M'  # LLM: SmolLM2-135M (30 x 576, 9 heads / 3 kv), the foveated origin's
look_weight = 0.0         # real clips carry no target positions (the look loss is synthetic-only)
# reads: soft (read_top_k=0), one pass from the static reads: the best unsupervised variant on the synthetic task
#   (look_weight=0 ablation in notes/foveated.md: hard top-k glimpses, recurrence, REINFORCE did not beat it)
caption_tokens = 96
n_caption_eval = 128
max_steps = 20000
batch_size = 8
lr = 3e-4
warmup_steps = 500
weight_decay = 0.1
n_eval = 512
eval_batch = 32
dtype = 'bfloat16'
compile = True
