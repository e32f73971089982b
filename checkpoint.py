"""
Checkpoints and run directories: a checkpoint is a directory <ckpt>/model.safetensors + meta.json (+ optim.pt
to resume), written to a temp dir and swapped in atomically. Also: the RNG states a resume restores, the config
a checkpoint imposes on the run, and the Hugging Face Hub (hf:owner/name sources, push with a model card).
"""
import json
import os
import random
import shutil
import time
from dataclasses import fields

import numpy as np
import torch

from model import GPT, GPTConfig, InputError


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers (saved without '_orig_mod.' prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)

def save_checkpoint(ckpt_dir, model, optimizer=None, meta=None):
    """Writes a complete checkpoint to a temp dir, then swaps it in: an interrupted save leaves the
    previous checkpoint readable (at ckpt_dir, or at ckpt_dir.prev in the instant between renames)."""
    from safetensors.torch import save_file
    ckpt_dir = os.path.normpath(ckpt_dir)
    tmp, prev = ckpt_dir + ".tmp", ckpt_dir + ".prev"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta or {}, f, indent=1, default=str)
    for name in os.listdir(tmp):  # on disk before the old one goes: a power cut must not leave two half checkpoints
        fsync_path(os.path.join(tmp, name))
    if os.path.exists(ckpt_dir):
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(ckpt_dir, prev)
    os.replace(tmp, ckpt_dir)
    fsync_path(os.path.dirname(ckpt_dir) or ".")  # the renames themselves
    shutil.rmtree(prev, ignore_errors=True)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the files themselves were synced
        pass
    finally:
        os.close(fd)


def resolve_checkpoint(src):
    """A checkpoint dir, or 'hf:owner/name' downloaded through huggingface_hub -> local dir."""
    if src.startswith("hf:"):
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(repo_id=src[3:])
        except Exception as e:  # offline, no such repo, no access: one line that names the repo
            raise InputError(f"could not fetch '{src}' from the Hugging Face Hub: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    src = os.path.normpath(src)
    if not os.path.exists(os.path.join(src, "meta.json")) and os.path.exists(os.path.join(src + ".prev", "meta.json")):
        return src + ".prev"  # a save was interrupted between its two renames
    if not os.path.isdir(src):
        raise FileNotFoundError(f"checkpoint directory not found: {src}")
    return src


def load_meta(src):
    path = os.path.join(resolve_checkpoint(src), "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no meta.json in checkpoint {os.path.dirname(path)}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"checkpoint meta {path} is corrupted: {e}") from None


def adopt_checkpoint_config(meta, config, keys, verbose=True, absent=None):
    """The model's shape comes from the checkpoint: config's `keys` take the values the checkpoint was trained
    with (each change printed), so the run's config and results.json describe the model it really trains.
    absent: {key: value} a checkpoint written before the key existed was built with (its config lacks the key).
    -> {key: value} for those keys (a script puts them back into its globals)."""
    absent = absent or {}
    for k in keys:
        if k in meta.get("config", {}):
            value = meta["config"][k]
        elif k in absent:
            value = absent[k]
        else:
            continue
        value = tuple(value) if isinstance(config[k], tuple) and isinstance(value, list) else value  # JSON: no tuples
        if value != config[k]:
            if verbose:
                print(f"from checkpoint: {k}={value!r} (config said {config[k]!r})")
            config[k] = value
    return {k: config[k] for k in keys}


def load_checkpoint(src, model, optimizer=None, strict=True):
    """Loads weights (and optimizer state, with weights_only=True) into model. Returns meta."""
    from safetensors.torch import load_file
    src = resolve_checkpoint(src)
    meta = load_meta(src)
    path = os.path.join(src, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model.safetensors in checkpoint {src}")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error types on truncated/garbled files
        raise InputError(f"checkpoint weights {path} are corrupted or unreadable: {e}") from None
    own = unwrap(model).state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict would raise a multi-line RuntimeError listing every tensor
        raise InputError(f"checkpoint {src} does not match the model: {len(wrong)} shape mismatches, "
                         f"e.g. {'; '.join(wrong[:3])}")
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise InputError(f"checkpoint {src} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        opt_path = os.path.join(src, "optim.pt")
        if not os.path.exists(opt_path):
            raise FileNotFoundError(f"no optim.pt in checkpoint {src} (needed to resume)")
        try:
            opt_state = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated/garbled file: pickle/zip errors
            raise InputError(f"checkpoint optimizer state {opt_path} is corrupted or unreadable: {e}") from None
        saved = "AdamW + Muon" if "pair" in opt_state else "AdamW"
        used = "AdamW + Muon" if hasattr(optimizer, "optimizers") else "AdamW"  # runtime.OptimizerPair
        if saved != used:
            raise InputError(f"checkpoint optimizer state {opt_path} is {saved}'s, this run uses {used} (the optim key)")
        try:
            optimizer.load_state_dict(opt_state)
        except ValueError as e:  # a different parameter grouping
            raise InputError(f"checkpoint optimizer state {opt_path} does not match the optimizer: {e}") from None
    return meta


def rng_state():
    """Everything random a resume must restore (the data order itself is a function of the step)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state().tolist(), python=[version, list(mt), gauss],
                 numpy=[kind, keys.tolist(), pos, has_gauss, cached])
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout / sampling noise drawn on the GPU
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def all_rng_states():
    """Every rank's rng_state(), a list indexed by rank ([one] on a single process), for a checkpoint that rank 0
    writes: each rank draws its own noise (seeded seed + rank), so a resume restores each its own. Under DDP a
    collective: every rank calls it, at the same step. (train_seg_gumbel.py, whose Gumbel noise and masking come
    from the RNG, uses it; the other recipes draw nothing random while training, so rank 0's rng_state() does.)"""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(state):
    """state: rng_state()'s dict, or all_rng_states()'s list (this rank takes its own; a run resumed on another
    number of ranks takes rank % saved, so it continues, though not draw for draw)."""
    if isinstance(state, list):
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        state = state[rank % len(state)]
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def from_pretrained(src, build_model):
    """src: a checkpoint dir or 'hf:owner/name'. build_model(meta) -> nn.Module. Returns (model, meta)."""
    src = resolve_checkpoint(src)
    model = build_model(load_meta(src))
    return model, load_checkpoint(src, model)


def gpt_from_pretrained(src):
    """A bare GPT checkpoint (meta['gpt'] holds its GPTConfig)."""
    def build(meta):
        if "gpt" not in meta:
            raise InputError(f"{src} is not a GPT checkpoint: its meta.json has no 'gpt' config "
                             f"(recipe {meta.get('recipe', '?')!r})")
        return GPT(dataclass_from_dict(GPTConfig, meta["gpt"]))
    return from_pretrained(src, build)[0]


def dataclass_from_dict(cls, d):
    """Build a config dataclass from a meta dict, ignoring keys it does not know."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def run_dir(out_dir, recipe, init_from="scratch"):
    """Where a run writes. out_dir='' gives a fresh unique out/<recipe>-<timestamp> (runs never overwrite
    each other's checkpoints); init_from='resume' with out_dir='' picks the newest run of this recipe. Under DDP
    rank 0 decides and every rank gets its answer (a clock read on each rank could straddle a second)."""
    if out_dir:
        return out_dir
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return pick_run_dir(recipe, init_from)
    holder = [pick_run_dir(recipe, init_from) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def pick_run_dir(recipe, init_from):
    if init_from == "resume":
        runs = sorted(d for d in os.listdir("out") if d.startswith(recipe + "-")) if os.path.isdir("out") else []
        runs = [d for d in runs if any(os.path.exists(os.path.join("out", d, c, "meta.json")) for c in ("ckpt", "ckpt.prev"))]
        if not runs:
            raise FileNotFoundError(f"init_from='resume' but no out/{recipe}-*/ckpt to resume; pass --out_dir=")
        return os.path.join("out", runs[-1])
    stamp, n = time.strftime('%Y%m%d-%H%M%S'), 0
    while True:  # makedirs claims the name: two runs started in the same second get -1, -2, ...
        path = os.path.join("out", f"{recipe}-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1


def write_model_card(ckpt_dir, recipe, metrics=None, config=None):
    """A README.md model card beside the weights: what it is, its measured metrics, its config."""
    lines = [f"---\nlibrary_name: pytorch\ntags: [vision-language, {recipe}]\n---", f"# {recipe}", "",
             f"Trained with `train_{recipe}.py`. Load with `python train_{recipe}.py --init_from=hf:<this repo> "
             f"--eval_only=True`.", "", "## Metrics (held-out split, measured at save time)", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in (metrics or {}).items()] or ["- (none recorded)"]
    lines += ["", "## Config", "", "```json", json.dumps(config or {}, indent=1, default=str), "```", ""]
    with open(os.path.join(ckpt_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def push_to_hub(ckpt_dir, repo_id, recipe, metrics=None, config=None):
    """Uploads a checkpoint dir (safetensors + meta.json + a generated model card) to the Hub.
    Only when asked (push_to_hub='owner/name'); optimizer state stays local."""
    from huggingface_hub import HfApi
    write_model_card(ckpt_dir, recipe, metrics, config)
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=ckpt_dir, repo_id=repo_id, ignore_patterns=["optim.pt"])


def check_repo_id(repo_id):
    """push_to_hub='owner/name' is checked when the run starts, not after an hour of training."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise InputError(f"push_to_hub must look like 'owner/name', got {repo_id!r}")


def push_run_to_hub(repo_id, out_dir, recipe, config, ckpt_name="ckpt"):
    """End of a run with push_to_hub=owner/name: the run's checkpoint + a model card carrying the metrics of
    its results.json. A failed upload raises (the checkpoint stays on disk; push again with model.push_to_hub)."""
    ckpt_dir = os.path.join(out_dir, ckpt_name)
    results_path = os.path.join(out_dir, "results.json")
    metrics = json.load(open(results_path))["metrics"] if os.path.exists(results_path) else None
    push_to_hub(ckpt_dir, repo_id, recipe, metrics, config)
    print(f"pushed {ckpt_dir} to https://huggingface.co/{repo_id}")
