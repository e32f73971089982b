"""
LoRA: low-rank adapters on chosen linear layers of a (loaded) model, the base frozen.

Each adapted nn.Linear gets a weight parametrization W + (alpha / r) * B @ A, so every path that reads the
weight (GPT's fused q|k|v matmul, generate()'s packed decode weights, the fused head loss) sees the adapted
matrix. B starts at zero: a freshly adapted model computes exactly what the base did.
Adapters are saved alone in peft's format (adapter_config.json + adapter_model.safetensors, keys
'base_model.model.<module>.lora_A.weight'), loaded back exactly, and merged into plain weights on request.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from model import InputError


class LoRA(nn.Module):
    """The parametrization: weight -> weight + scale * B @ A (A: r x in, B: out x r)."""

    def __init__(self, out_features, in_features, rank, alpha):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init of A
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def lora_modules(model):
    """{name: LoRA} of every adapted linear layer."""
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], LoRA)}


def add_lora(model, rank=8, alpha=16, targets=("c_q", "c_v")):
    """Adapters on every nn.Linear whose name ends in one of `targets`; every other parameter of `model` frozen.
    Refuses a model that already has adapters (wrapping them twice would stack two deltas)."""
    if lora_modules(model):
        raise InputError("this model already has LoRA adapters: adding (or loading) them again would wrap them twice")
    if rank <= 0:
        raise InputError(f"lora rank must be positive, got {rank}")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not chosen:
        raise InputError(f"no linear layer is named one of {list(targets)} (lora_targets)")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in chosen:
        w = m.weight
        parametrize.register_parametrization(m, "weight", LoRA(w.shape[0], w.shape[1], rank, alpha).to(w.device))
    return model


def merge_lora(model):
    """Fold every adapter into its weight and drop the parametrization: a plain model again."""
    for name in lora_modules(model):
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)
    return model


def lora_config(model):
    """(rank, alpha, targets) of an adapted model, as its checkpoint meta records them."""
    mods = lora_modules(model)
    if not mods:
        return None
    first = next(iter(mods.values()))
    rank = first.lora_A.shape[0]
    return dict(rank=rank, alpha=first.scale * rank, targets=sorted({n.split(".")[-1] for n in mods}))


def save_adapter(model, out_dir, base_model=""):
    """The adapters alone, in peft's layout."""
    from safetensors.torch import save_file
    cfg = lora_config(model)
    if cfg is None:
        raise InputError("the model has no LoRA adapters to save")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, lora in lora_modules(model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora.lora_B.detach().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(peft_type="LORA", r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"],
                  lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                  base_model_name_or_path=base_model, inference_mode=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)


# peft options that would change what an adapter computes; this loader supports each only at its neutral value
_NEUTRAL = dict(bias="none", lora_bias=False, fan_in_fan_out=False, use_dora=False, use_qalora=False, rank_pattern={},
                alpha_pattern={}, layers_to_transform=None, layer_replication=None, modules_to_save=None,
                target_parameters=None, trainable_token_indices=None, alora_invocation_tokens=None)


def load_adapter(model, adapter_dir):
    """Adapters saved by save_adapter or by peft (LoRA, same module names) onto `model`, exactly: every tensor
    in the file used, every adapted layer given both factors."""
    from safetensors.torch import load_file
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise InputError(f"missing file: {path}")
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    odd = {k: cfg[k] for k, v in _NEUTRAL.items() if cfg.get(k) not in (v, None)}
    if odd:
        raise InputError(f"{config_path}: unsupported LoRA options {odd}")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    rank, alpha = cfg["r"], cfg["lora_alpha"]
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    add_lora(model, rank=rank, alpha=alpha, targets=tuple(targets))
    state = load_file(weights_path)
    mods = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise InputError(f"{adapter_dir}: adapter does not match the model: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, lora in mods.items():
            for ab in "AB":
                src, dst = state[f"base_model.model.{name}.lora_{ab}.weight"], getattr(lora, f"lora_{ab}")
                if src.shape != dst.shape:
                    raise InputError(f"{adapter_dir}: {name}.lora_{ab} is {tuple(src.shape)}, the model needs "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)
    return model
