"""LoRA adapters: exact against peft (its files read and written both ways), frozen base, bit-identical reload,
merge, and the twice-wrapped reload refused."""
import pytest
import torch
import torch.nn as nn

from checkpoint import load_checkpoint, save_checkpoint
from lora import add_lora, load_adapter, lora_config, lora_modules, merge_lora, save_adapter
from model import GPT, GPTConfig, InputError


class TwoLinears(nn.Module):
    """A module whose forward calls its linears (peft's adapters act there)."""

    def __init__(self):
        super().__init__()
        self.c_q, self.c_v, self.out = nn.Linear(12, 16), nn.Linear(12, 8, bias=False), nn.Linear(24, 5)

    def forward(self, x):
        return self.out(torch.cat([self.c_q(x), self.c_v(x)], -1).tanh())


def randomised(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return randomised(GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, sequence_len=32)), seed)


def test_peft_adapter_loads_exactly_and_ours_loads_into_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    base = randomised(TwoLinears(), 0)
    x = torch.randn(3, 12)
    peft_model = get_peft_model(randomised(TwoLinears(), 0), LoraConfig(r=3, lora_alpha=6, target_modules=["c_q", "c_v"]))
    with torch.no_grad():  # peft starts B at zero: give every factor a value so the test sees the adapters
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(randomised(TwoLinears(), 0), tmp_path / "peft")
    want = peft_model(x)
    torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base(x), want, atol=1e-3)  # the adapters change the output

    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(randomised(TwoLinears(), 0), tmp_path / "ours")
    torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)


def test_gpt_adapters_train_alone_and_reload_bit_identical(tmp_path):
    model = add_lora(tiny_gpt(), rank=4, alpha=8, targets=("c_q", "c_k", "c_v", "c_proj"))
    idx = torch.randint(0, 64, (2, 16))
    before_lora = tiny_gpt()(idx)[0]
    torch.testing.assert_close(model(idx)[0], before_lora, atol=0, rtol=0)  # B = 0: the base model, exactly
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(lora_modules(model)) == 2 * 2 * 5  # 2 layers x (q k v attn-proj mlp-proj)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():  # the base never moved
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    trained = model.eval()(idx)[0]
    assert not torch.allclose(trained, before_lora, atol=1e-4)

    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(tiny_gpt(), tmp_path / "adapter")
    assert torch.equal(reloaded(idx)[0], trained)
    assert lora_config(reloaded) == dict(rank=4, alpha=8.0, targets=["c_k", "c_proj", "c_q", "c_v"])
    # generation reads the adapted weights too (decode_weights packs weight, which the parametrization computes)
    assert torch.equal(reloaded.generate(idx[:, :4], 8), model.generate(idx[:, :4], 8))
    with pytest.raises(InputError, match="wrap them twice"):
        load_adapter(reloaded, tmp_path / "adapter")


def test_checkpoint_with_adapters_and_merge(tmp_path):
    model = add_lora(tiny_gpt(), rank=2, alpha=2)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora_B.normal_(0, 0.5)
    idx = torch.randint(0, 64, (2, 16))
    want = model(idx)[0]
    save_checkpoint(str(tmp_path / "ckpt"), model, meta=dict(lora=lora_config(model)))
    again = add_lora(tiny_gpt(), rank=2, alpha=2)
    load_checkpoint(str(tmp_path / "ckpt"), again)
    assert torch.equal(again(idx)[0], want)

    merged = merge_lora(again)
    assert not lora_modules(merged)
    assert all("lora_" not in k and "parametrizations" not in k for k in merged.state_dict())
    torch.testing.assert_close(merged(idx)[0], want, atol=1e-5, rtol=1e-5)


def test_bad_adapters_are_refused(tmp_path):
    with pytest.raises(InputError, match="no linear layer is named"):
        add_lora(tiny_gpt(), targets=("q_proj",))
    with pytest.raises(InputError, match="missing file"):
        load_adapter(tiny_gpt(), tmp_path)
    model = add_lora(tiny_gpt(), rank=2, alpha=2)
    save_adapter(model, tmp_path / "a")
    wider = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48, sequence_len=32))
    with pytest.raises(InputError, match="lora_A is"):
        load_adapter(wider, tmp_path / "a")
    deeper = GPT(GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, sequence_len=32))
    with pytest.raises(InputError, match="missing"):
        load_adapter(deeper, tmp_path / "a")


def test_optimizers_take_only_the_adapters():
    from runtime import configure_optimizers
    model = add_lora(tiny_gpt(), rank=2, alpha=2)
    for optimizer in ("adamw", "muon"):
        opt = configure_optimizers(model, 1e-3, optimizer=optimizer)
        groups = opt.optimizers if hasattr(opt, "optimizers") else [opt]
        params = [p for o in groups for g in o.param_groups for p in g["params"]]
        assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
