"""
Foreign weights into this repo's modules, each loaded exactly or refused.

  sources     a local dir or 'hf:owner/name' (huggingface_hub; its offline cache is used when the Hub is
              unreachable), read lazily from safetensors (one file or a sharded index) so a loader takes only
              the tensors it needs
  Weights     the source's tensors by name; every key a loader does not take is an error unless the loader
              names it as ignored (e.g. a two-tower checkpoint's text tower)
  assign      the converted tensors into a module: every parameter and buffer given, every shape equal
"""
import json
import os
import re

import torch

from model import InputError


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
