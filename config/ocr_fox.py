# GPU scale, DeepSeek-OCR's shapes: SAM ViT-B (768 wide, 12 layers, window 14, global at 2/5/8/11, patch 16)
# -> neck 256 -> net_2 512 -> net_3 1024 (16x16 tokens at 1024 px) -> CLIP ViT-L (1024 wide, 24 layers)
# -> concat 2048 -> projector -> nanochat base-d20 (20 layers x 1280, 10 heads of 128; shape read from the checkpoint).
# 273 vision tokens: (16+1)*16+1. Train on a JSONL of {image, text}; evaluate on Fox's English pages.
#   torchrun --nproc_per_node=8 train_ocr.py config/ocr_fox.py --train_data=ocr_train.jsonl
#   (Fox elsewhere: --val_data=<dir>/en_page_ocr.json --image_root=<dir>/en_pdf_png)
#   then stage 2:  ... --stage=2 --init_encoder=out/ocr-<stage 1>/encoder   (with a fresh d20, as the journal)
# needs (--plan=True --batch_size=2, bf16, random weights of these shapes, SAM frozen, 2026-12-06 CPU trace on synthetic
#   pages, whose texts are far shorter than 1536 tokens): 13.3 GiB of parameters, gradients and AdamW state + 1.37 GiB
#   activations per page (0.30 checkpointed): ~19 GiB per process at batch 4 before long pages: an 80 GB GPU
init_encoder = 'hf:deepseek-ai/DeepSeek-OCR'  # vision: DeepSeek-OCR's trained DeepEncoder, SAM frozen (journal's fix)
dataset = 'fox'
val_data = 'fox/en_page_ocr.json'
image_root = 'fox/en_pdf_png'  # the official release keeps the pages here, beside the JSON (every one checked at setup)
image_size = 1024
sam_patch = 16
sam_dim = 768
sam_layers = 12
sam_heads = 12
sam_window = 14
sam_global = (2, 5, 8, 11)
neck_dim = 256
clip_layers = 24
clip_heads = 16
init_gpt = 'hf:nanochat-students/base-d20'  # LLM: nanochat base-d20 (nanochat format), the OCR journal's own LLM
max_text_tokens = 1536     # BPE targets (~4.9 bytes a token: a full page in ~1k); seq 1 + 273 + 4 + 1536 + 1 <= 2048
batch_size = 4             # per GPU
lr = 5e-5                  # stage 1 (stage 2: --lr=3e-5)
min_lr_frac = 0.1
warmup_steps = 200
weight_decay = 0.0
max_steps = 5000
log_interval = 10
eval_interval = 500
n_eval = 112               # Fox English page-OCR set
eval_batch = 8
bench_tokens = 256
dtype = 'bfloat16'
compile = True
