# Crop mode (DeepSeek-OCR's "Gundam" tiling) at CPU scale: 128 x 128 synthetic pages read through a 64 px global
# view plus 2 x 2 crops of 64 px: 21 + (2*4 + 1) * 2*4 = 93 vision tokens a page. Up to 7 lines at the recipe's
# density (7 px pitch, 16 px lines), so each crop holds what one untiled 64 px page holds.
#   python train_ocr.py config/ocr_gundam.py
# GPU scale, DeepSeek-OCR's Gundam mode (1024 px global view + 640 px crops of its trained DeepEncoder, whose
# CLIP resizes its positions; no batch centring): untested here (no GPU, no weights offline)
#   torchrun --nproc_per_node=8 train_ocr.py config/ocr_fox.py --crop_mode=True --crop_size=640 --max_crops=6
crop_mode = True           # crop_size: the default 64 px
page_width = 128
page_height = 128
max_lines = 7
max_text_tokens = 144
