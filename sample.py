"""
Generate from any GPT source: the first check after downloading weights is that they talk sense.

    python sample.py --init_from=hf:karpathy/nanochat-d32 --prompt="The capital of France is"
    python sample.py --init_from=hf:HuggingFaceTB/SmolLM2-135M --prompt="Gravity is" --temperature=0.8 --top_k=50
    python sample.py --init_from=out/<run>/ckpt --prompt="hello"       # a recipe's checkpoint: its language model

init_from is anything pretrained.load_gpt reads: this repo's checkpoints (a bare GPT or a recipe's, whose GPT is
taken alone), nanochat's model_<step>.pt + meta_<step>.json, a Llama-family transformers dir; local or hf:owner/name.
The prompt starts with the source's BOS where it has one. Prints the continuation (special tokens skipped).
"""
import torch

from runtime import install_error_hook
install_error_hook()
from configurator import configure  # noqa: E402
from model import InputError  # noqa: E402
from pretrained import load_gpt  # noqa: E402
from runtime import resolve_device  # noqa: E402

init_from = ''         # a dir or hf:owner/name
step = -1              # nanochat: which model_<step>.pt (-1: the newest)
prompt = 'Hello'
max_new_tokens = 64
temperature = 0.0      # 0: greedy
top_k = 0              # 0: no top-k cut
num_samples = 1
seed = 1337
device = 'auto'
config = configure(globals())

if not init_from:
    raise InputError("init_from= is required: a checkpoint dir or hf:owner/name")
model, tok, meta = load_gpt(init_from, None if step < 0 else step)
if tok is None:
    raise InputError(f"{init_from}: its GPT's vocabulary is not text (recipe {meta.get('recipe')!r}); nothing to sample")
device = resolve_device(device)
model.to(device)
c = model.config
print(f"{init_from} ({meta['format']} format): {model.num_params():,} params, {c.n_layer} layers x {c.n_embd} "
      f"({c.n_head} heads / {c.n_kv_head} kv), vocab {c.vocab_size}")
ids = ([tok.bos] if tok.bos is not None else []) + tok.encode(prompt)
if not ids:
    raise InputError("the prompt is empty and the source has no BOS token to start from")
idx = torch.tensor([ids] * num_samples, device=device)
generator = torch.Generator(device=device).manual_seed(seed)
out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=generator)
for row in out.tolist():
    print("-" * 40)
    print(tok.decode(row))
