"""
Foreign weights into this repo's modules, each loaded exactly or refused.

  sources     a local dir or 'hf:owner/name' (huggingface_hub; its offline cache is used when the Hub is
              unreachable), read lazily from safetensors (one file or a sharded index) so a loader takes only
              the tensors it needs
  Weights     the source's tensors by name; every key a loader does not take is an error unless the loader
              names it as ignored (e.g. a two-tower checkpoint's text tower)
  assign      the converted tensors into a module: every parameter and buffer given, every shape equal
  load_gpt    a language model into model.GPT with its tokenizer: this repo's checkpoints, nanochat's
              (model_<step>.pt + meta_<step>.json + tokenizer.pkl), the Hugging Face Llama family
  add_special_tokens  appends special tokens to a loaded tokenizer and grows the model's rows to match
"""
import codecs
import copyreg
import json
import os
import pickle
import re

import torch

from checkpoint import dataclass_from_dict
from data import Tokenizer
from model import GPT, GPTConfig, InputError


def resolve_source(src, allow_patterns=None):
    """A local dir, or 'hf:owner/name' fetched through huggingface_hub -> local dir. allow_patterns limits
    the download (e.g. to skip files a loader never reads). When the Hub cannot be reached the local cache
    is tried before giving up (HF_HUB_OFFLINE=1 goes straight to it)."""
    if src.startswith("hf:"):
        from huggingface_hub import snapshot_download
        repo = src[3:]
        try:
            return snapshot_download(repo_id=repo, allow_patterns=allow_patterns)
        except Exception as first:  # offline, no such repo, no access
            try:
                return snapshot_download(repo_id=repo, allow_patterns=allow_patterns, local_files_only=True)
            except Exception:
                raise InputError(f"could not fetch '{src}' from the Hugging Face Hub and it is not in the local "
                                 f"cache: {type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
                                 ) from None
    if not os.path.isdir(src):
        raise InputError(f"no such directory: {src}")
    return src


def read_json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(src):
    """The weight files of a transformers-layout dir: model.safetensors, or the shards its index names."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json_file(index)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(src, s))]
        if missing:
            raise InputError(f"{index} names shards that are not in {src}: {missing[:3]}")
        return [os.path.join(src, s) for s in shards]
    single = os.path.join(src, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise InputError(f"no model.safetensors or model.safetensors.index.json in {src}")


class Weights:
    """A source's tensors by name, read one at a time from safetensors files (never the whole set), or held
    in a dict (a torch.load'ed checkpoint). take() marks a key used; finish() refuses any key left untaken,
    so a tensor the converter did not expect is never silently dropped."""

    def __init__(self, files=None, tensors=None, where=""):
        self.where = where
        self.tensors = tensors
        self.file_of = {}
        for path in files or ():
            from safetensors import safe_open
            try:
                with safe_open(path, framework="pt") as f:
                    self.file_of.update({k: path for k in f.keys()})
            except Exception as e:  # safetensors raises its own types on truncated or garbled files
                raise InputError(f"weights {path} are corrupted or unreadable: {e}") from None
        self.names = set(self.file_of) if tensors is None else set(tensors)
        self.taken = set()
        self.read = set()  # keys whose data was actually read (a test checks an LLM's tensors never are)

    def __contains__(self, key):
        return key in self.names

    def keys(self, prefix=""):
        return sorted(k for k in self.names if k.startswith(prefix))

    def take(self, key):
        if key not in self.names:
            raise InputError(f"{self.where}: missing weight '{key}'")
        self.taken.add(key)
        self.read.add(key)
        if self.tensors is not None:
            return self.tensors[key]
        from safetensors import safe_open
        with safe_open(self.file_of[key], framework="pt") as f:
            return f.get_tensor(key)

    def skip(self, pattern):
        """Mark every key matching the regex as deliberately unused (e.g. a text tower), without reading it."""
        self.taken.update(k for k in self.names if re.match(pattern, k))

    def finish(self):
        left = sorted(self.names - self.taken)
        if left:
            raise InputError(f"{self.where}: {len(left)} weights this loader does not know, e.g. {left[:5]}")


def assign(module, state, where):
    """Load `state` (name -> tensor) into module exactly: every parameter and persistent buffer given, no
    extra names, every shape equal; tensors are cast to the module's dtype."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise InputError(f"{where}: the converted weights do not match the model: missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise InputError(f"{where}: {len(wrong)} shape mismatches, e.g. {'; '.join(wrong[:3])}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return module


# -----------------------------------------------------------------------------
# language models: load_gpt(src) -> (model.GPT, tokenizer, meta) from this repo's checkpoints, nanochat's, and
# transformers' (the Llama family, nanochat's port); tokenizers with one interface (data.Tokenizer's): encode(text) (special-token
# text stays text), decode(ids, skip_special=True), tok["<name>"], vocab_size, bos (None where the source has
# none), add_specials(names)

# the Hub files a GPT loader may read (weights, configs, tokenizers), not the rest of a repo (ONNX exports, ...)
GPT_FILES = ["*.json", "*.safetensors", "*model_*.pt", "*tokenizer.pkl"]


def load_gpt(src, step=None):
    """src: a local dir or 'hf:owner/name' holding this repo's checkpoint (a bare GPT or a recipe's), a nanochat
    checkpoint, or a transformers checkpoint (Llama family, nanochat); recognised from its files, its shape read
    from them.
    step: which nanochat model_<step>.pt (default the newest). -> (GPT in fp32, eval mode, tokenizer or None where
    the vocabulary is not text, meta: what the source says about itself, with 'format')."""
    path = resolve_source(src, allow_patterns=GPT_FILES if src.startswith("hf:") else None)
    if os.path.exists(os.path.join(path, "meta.json")):
        fmt, loader = "this repo", load_own_gpt
    elif os.path.exists(os.path.join(path, "config.json")):
        fmt, loader = "transformers", load_hf
    elif nanochat_dir(path):
        fmt, loader = "nanochat", load_nanochat
    else:
        raise InputError(f"no checkpoint in {src}: expected meta.json + model.safetensors (this repo), "
                         f"model_<step>.pt + meta_<step>.json (nanochat) or config.json + model.safetensors (transformers)")
    if step is not None and fmt != "nanochat":
        raise InputError(f"step={step} names a nanochat model_<step>.pt, but {src} is a {fmt} checkpoint")
    model, tok, meta = loader(path, step)
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise InputError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model's vocab is only "
                         f"{model.config.vocab_size}")
    return model.eval(), tok, dict(meta, format=fmt, source=src)


def add_special_tokens(model, tok, names):
    """Appends the special tokens `names` that tok lacks and grows model's embedding and head to match. Each new
    token's rows start as the mean of the model's existing rows (the usual init: a typical embedding, no logit
    bias towards or against it); every other row stays bit-identical. -> the ids of `names`."""
    old_tok, old_vocab = tok.vocab_size, model.config.vocab_size
    ids = tok.add_specials(names)
    new = sorted({i for i in ids if i >= old_tok})  # may land on spare rows a model has past its tokenizer
    with torch.no_grad():
        means = [m.weight[:old_vocab].mean(0) for m in (model.transformer.wte, model.lm_head)]
        model.resize_token_embeddings(max(old_vocab, tok.vocab_size))
        for m, mean in zip((model.transformer.wte, model.lm_head), means):
            m.weight[new] = mean  # (tied: the same matrix twice, the same mean)
    return ids


def load_recipe_gpt(src, specials):
    """A recipe's init_gpt: the LLM at src with its tokenizer, the recipe's special tokens appended (and <|bos|>
    where the tokenizer has no BOS of its own), rows grown to match. -> (GPT, tokenizer, the names appended: what a
    checkpoint records as 'specials', beside 'gpt_source', so that own_tokenizer rebuilds the same ids)."""
    model, tok, _ = load_gpt(src)
    if tok is None:
        raise InputError(f"{src}: its GPT's vocabulary is not text (a LaneLM checkpoint?); a recipe needs a text LLM")
    names = list(specials) + ([] if tok.bos is not None else ["<|bos|>"])
    add_special_tokens(model, tok, names)
    return model, tok, names


def recipe_llm(init_gpt, run, specials, verbose=True):
    """A recipe's language model. From scratch with init_gpt: the source's GPT and tokenizer, the recipe's specials
    appended (load_recipe_gpt). From a checkpoint of such a run (its meta names gpt_source): that tokenizer rebuilt,
    the GPT left to the checkpoint (None). -> (GPT or None, tokenizer or None, specials, gpt_source)."""
    if init_gpt and run.ckpt_src and verbose and not run.resume:
        print(f"init_gpt={init_gpt} not loaded: the GPT and its tokenizer are the checkpoint's")
    if init_gpt and not run.ckpt_src:
        return (*load_recipe_gpt(init_gpt, specials), init_gpt)
    source = run.meta.get("gpt_source", "") if run.ckpt_src else ""
    if source:
        return None, own_tokenizer(run.meta), run.meta["specials"], source
    return None, None, None, ""


# -- this repo's checkpoints


def load_own_gpt(path, step):
    """A checkpoint this repo wrote: a bare GPT, or a recipe's whole model whose language model is under 'gpt.'
    (the vision side is left unread). The tokenizer is data.Tokenizer with the specials the meta records."""
    meta = read_json_file(os.path.join(path, "meta.json"))
    if "gpt" not in meta:
        raise InputError(f"{path} holds no GPT: its meta.json has no 'gpt' config (kind {meta.get('kind', '?')!r})")
    weights = Weights(safetensors_files(path), where=path)
    prefix = "gpt." if "gpt.transformer.wte.weight" in weights else ""
    model = GPT(dataclass_from_dict(GPTConfig, meta["gpt"]))
    state = {k: weights.take(prefix + k) for k in model.state_dict()}
    if prefix:
        weights.skip(r"(?!gpt\.)")  # the recipe's vision side
    weights.finish()
    assign(model, state, path)
    return model, own_tokenizer(meta), dict(recipe=meta.get("recipe"), step=meta.get("step"), gpt=meta["gpt"])


def own_tokenizer(meta):
    """data.Tokenizer as the recipe built it (its base and recorded specials); None for LaneLM, whose GPT speaks
    lane coordinates (its meta describes that vocabulary under 'tokenizer')."""
    if "tokenizer" in meta:
        return None
    if meta.get("gpt_source"):  # a recipe run from a loaded LLM (init_gpt): its tokenizer, the recipe's specials after
        tok = load_gpt(meta["gpt_source"])[1]
        tok.add_specials(meta.get("specials", ()))
        return tok
    base = meta.get("config", {}).get("tokenizer", "bytes")
    return Tokenizer(specials=meta.get("specials", ()), base=base if isinstance(base, str) else "bytes")


# -- nanochat (karpathy/nanochat), classic format: model_<step>.pt + meta_<step>.json

NANOCHAT_SHAPE = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# what nanochat's later gpt.py added: value embeddings and their gates, residual / x0 lambdas, smear, backout
NANOCHAT_NEWER = re.compile(r"resid_lambdas|x0_lambdas|smear_|backout_|value_embeds\.|.*\.ve_gate\.")


def nanochat_dir(path):
    """The dir holding model_<step>.pt files: path itself, or nanochat's base_checkpoints/d<N>/ under path
    (the deepest model, as nanochat picks); None if neither."""
    if has_nanochat_weights(path):
        return path
    for root in (path, os.path.join(path, "base_checkpoints")):
        tags = [d for d in (os.listdir(root) if os.path.isdir(root) else [])
                if re.fullmatch(r"d\d+", d) and has_nanochat_weights(os.path.join(root, d))]
        if tags:
            return os.path.join(root, max(tags, key=lambda d: int(d[1:])))
    return None


def has_nanochat_weights(path):
    return os.path.isdir(path) and any(re.fullmatch(r"model_\d+\.pt", f) for f in os.listdir(path))


def load_nanochat(path, step):
    ckpt = nanochat_dir(path)
    steps = {int(m.group(1)): m.group(1) for f in os.listdir(ckpt) if (m := re.fullmatch(r"model_(\d+)\.pt", f))}
    if step is not None and step not in steps:
        raise InputError(f"no model_<step>.pt for step {step} in {ckpt} (steps: {sorted(steps)})")
    tag = steps[max(steps) if step is None else step]
    model_path, meta = os.path.join(ckpt, f"model_{tag}.pt"), read_json_file(os.path.join(ckpt, f"meta_{tag}.json"))
    shape = meta.get("model_config")
    if not isinstance(shape, dict):
        raise InputError(f"{ckpt}/meta_{tag}.json has no model_config")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or a pickle that weights_only refuses
        raise InputError(f"{model_path} is corrupted or not a plain state dict: {str(e).splitlines()[0]}") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper, as saved
    newer_fields = sorted(set(shape) - set(NANOCHAT_SHAPE))
    newer_keys = sorted(k for k in state if NANOCHAT_NEWER.match(k))
    if newer_fields or newer_keys:
        raise InputError(f"{model_path}: a newer nanochat format than this loader reads (classic nanochat only): "
                         f"model_config fields {newer_fields}, weights {newer_keys[:4]}")
    lacking = [k for k in NANOCHAT_SHAPE if k not in shape]
    if lacking:
        raise InputError(f"{ckpt}/meta_{tag}.json's model_config lacks {lacking}")
    model = GPT(nanochat_config(shape))
    weights = Weights(tensors={k: v.float() for k, v in state.items()}, where=model_path)  # bf16 upcast
    converted = {k: weights.take(k) for k in model.state_dict()}
    vocab, rows = shape["vocab_size"], converted["transformer.wte.weight"].shape[0]
    if rows not in (vocab, -(-vocab // 64) * 64):
        raise InputError(f"{model_path} has {rows} embedding rows but meta_{tag}.json says vocab_size {vocab}")
    for k in ("transformer.wte.weight", "lm_head.weight"):  # rows past the vocab pad it to a multiple of 64:
        converted[k] = converted[k][:vocab]                  # nanochat crops their logits, so they never count
    weights.finish()
    assign(model, converted, f"{model_path} with meta_{tag}.json")
    return model, nanochat_tokenizer(ckpt, path), dict(meta, step=int(tag), dir=ckpt)


def nanochat_config(shape):
    """Classic nanochat: rope base 10000 and F.rms_norm's default epsilon (both hard-coded, not in its meta),
    parameter-free norms (input, QK, blocks, final), relu^2 MLP, untied head, logit softcap 15."""
    return GPTConfig(**{k: int(shape[k]) for k in NANOCHAT_SHAPE}, rope_base=10000.0, norm_eps=None,
                     logit_softcap=15.0, input_norm=True, qk_norm=True, mlp="relu2")


def nanochat_tokenizer(ckpt, root):
    """tokenizer.pkl beside the weights (re-uploaded repos) or in nanochat's tokenizer/ dir (its base dir holds
    base_checkpoints/d<N>/ and tokenizer/)."""
    base_dir = os.path.dirname(os.path.dirname(os.path.normpath(ckpt)))
    for d in dict.fromkeys((ckpt, root, base_dir)):
        for f in ("tokenizer.pkl", os.path.join("tokenizer", "tokenizer.pkl")):
            if os.path.exists(os.path.join(d, f)):
                return read_tiktoken_pickle(os.path.join(d, f))
    raise InputError(f"no tokenizer.pkl beside {ckpt} or in nanochat's tokenizer/ dir")


class EncodingParts:
    """Stands in for tiktoken.Encoding while unpickling: keeps the pickled state and runs nothing."""

    def __setstate__(self, state):
        self.state = state


class TiktokenUnpickler(pickle.Unpickler):
    """Admits only what a pickled tiktoken Encoding refers to (the Encoding itself, replaced by EncodingParts;
    older pickle protocols' object reconstruction and bytes encoding); any other global is refused."""
    ALLOWED = {("tiktoken.core", "Encoding"): EncodingParts, ("copyreg", "_reconstructor"): copyreg._reconstructor,
               ("copy_reg", "_reconstructor"): copyreg._reconstructor, ("builtins", "object"): object,
               ("__builtin__", "object"): object, ("_codecs", "encode"): codecs.encode}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise InputError(f"tokenizer pickle refers to {module}.{name}: only a tiktoken Encoding is admitted")
        return self.ALLOWED[(module, name)]


def read_tiktoken_pickle(path):
    """A pickled tiktoken Encoding (nanochat's tokenizer.pkl) -> data.Tokenizer with its ranks and specials."""
    with open(path, "rb") as f:
        try:
            parts = TiktokenUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as e:
            raise InputError(f"{path} is not a readable tiktoken pickle: {e}") from None
    state = getattr(parts, "state", None)
    ok = (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and isinstance(v, int) for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and isinstance(v, int) for k, v in state["special_tokens"].items()))
    if not ok:
        raise InputError(f"{path} does not hold a tiktoken Encoding's ranks and special tokens")
    return Tokenizer.from_ranks(str(state.get("name", "nanochat")), state["pat_str"], state["mergeable_ranks"],
                                state["special_tokens"])


# -- Hugging Face transformers checkpoints: config.json + model.safetensors (or shards) + tokenizer.json. The Llama
# family (llama; mistral without a sliding window: the same maths) and transformers' port of nanochat

HF_TYPES = ("llama", "mistral", "nanochat")  # other model types are refused by name


def load_hf(path, step):
    cfg = read_json_file(os.path.join(path, "config.json"))
    config = hf_config(cfg, path)
    model = GPT(config)
    weights = Weights(safetensors_files(path), where=path)
    weights.skip(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old exports' recomputable buffers
    state = hf_state(weights, config, convert_rotary=cfg["model_type"] != "nanochat")
    weights.finish()
    assign(model, state, path)
    tok = HFTokenizer(os.path.join(path, "tokenizer.json"))
    return model, tok, dict(model_type=cfg["model_type"], dtype=cfg.get("dtype", cfg.get("torch_dtype")), config=cfg)


def hf_config(cfg, where):
    """config.json -> GPTConfig, reading both spellings (transformers 5's rope_parameters / dtype, the Hub's
    rope_theta / rope_scaling / torch_dtype); anything this GPT does not compute exactly is refused by name."""
    kind = cfg.get("model_type")
    if kind not in HF_TYPES:
        raise InputError(f"{where}: config.json's model_type {kind!r} is not supported "
                         f"(supported: {', '.join(HF_TYPES)})")
    nanochat = kind == "nanochat"  # relu^2, parameter-free norms (input and QK norm too), softcap; else Llama's
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or width // heads
    act = "relu2" if nanochat else "silu"
    refused = [f"hidden_act={cfg.get('hidden_act')!r}"] if cfg.get("hidden_act", act) != act else []
    refused += [f"{k}=True" for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
    refused += [f"rope type {rope_type!r}"] if rope_type not in ("default", "llama3") else []
    refused += [f"sliding_window={cfg['sliding_window']}"] if cfg.get("sliding_window") is not None else []
    refused += [f"head_dim={head_dim} x {heads} heads != hidden_size {width}"] if head_dim * heads != width else []
    if refused:
        raise InputError(f"{where}: {kind} with {', '.join(refused)} is not supported")
    llama3 = () if rope_type != "llama3" else tuple(float(rope[k]) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    return GPTConfig(vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_head=heads,
                     n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=width,
                     sequence_len=min(cfg.get("max_position_embeddings", 2048), 8192), rope_base=float(theta),
                     rope_llama3=llama3,
                     logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0) if nanochat else 0.0,
                     input_norm=nanochat, mlp="relu2" if nanochat else "swiglu",
                     intermediate_size=cfg["intermediate_size"], norm_gains=not nanochat,
                     norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), qk_norm=nanochat,
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def rotary_rows(w, n_heads):
    """q/k projection rows from Llama's rotary convention to this repo's. Llama's rotate_half turns each head's
    halves (x1, x2) into (x1 c - x2 s, x2 c + x1 s), this repo (as nanochat) into (x1 c + x2 s, x2 c - x1 s):
    negating x2 makes ours give Llama's first half and minus its second, so every q.k product is Llama's."""
    w = w.reshape(n_heads, 2, -1, w.shape[-1]).clone()
    w[:, 1] = -w[:, 1]
    return w.reshape(-1, w.shape[-1])


def hf_state(weights, config, convert_rotary):
    """transformers' names -> this GPT's. convert_rotary: Llama's q/k rows (transformers' nanochat port keeps
    nanochat's rotation)."""
    take = weights.take
    state = {"transformer.wte.weight": take("model.embed_tokens.weight")}
    if config.norm_gains:
        state["transformer.ln_f.weight"] = take("model.norm.weight")
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k = take(hf + "self_attn.q_proj.weight"), take(hf + "self_attn.k_proj.weight")
        if convert_rotary:
            q, k = rotary_rows(q, config.n_head), rotary_rows(k, config.n_kv_head)
        state |= {ours + "attn.c_q.weight": q, ours + "attn.c_k.weight": k,
                  ours + "attn.c_v.weight": take(hf + "self_attn.v_proj.weight"),
                  ours + "attn.c_proj.weight": take(hf + "self_attn.o_proj.weight")}
        if config.mlp == "swiglu":  # gate and up stacked in c_fc, gate first (model.MLP)
            fc = torch.cat([take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")])
            proj = take(hf + "mlp.down_proj.weight")
        else:
            fc, proj = take(hf + "mlp.fc1.weight"), take(hf + "mlp.fc2.weight")
        state |= {ours + "mlp.c_fc.weight": fc, ours + "mlp.c_proj.weight": proj}
        if config.norm_gains:
            state[ours + "ln_1.weight"] = take(hf + "input_layernorm.weight")
            state[ours + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in weights and not torch.equal(take("lm_head.weight"), state["transformer.wte.weight"]):
        raise InputError(f"{weights.where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    return state


class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library, with data.Tokenizer's interface. encode()
    leaves text that spells a special token as text; bos is the id the tokenizer's post-processor puts first
    (None if it adds none): prepend it where the source model expects it."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        if not os.path.exists(path):
            raise InputError(f"missing {path} (only fast tokenizers, tokenizer.json, are read)")
        self.tk = Tokenizer.from_file(path)
        self.tk.encode_special_tokens = True
        plain, full = self.tk.encode("a", add_special_tokens=False).ids, self.tk.encode("a").ids
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        self.bos = full[starts[0] - 1] if starts and starts[0] > 0 else None

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def special(self):
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def __getitem__(self, name):
        i = self.tk.token_to_id(name)
        if i is None:
            raise KeyError(name)
        return i

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=True):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def add_specials(self, names):
        from tokenizers import AddedToken
        new = [n for n in dict.fromkeys(names) if self.tk.token_to_id(n) is None]
        self.tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in new])
        return [self[n] for n in names]
