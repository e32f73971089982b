"""The memory plan against a measured peak: a training step's parameters, gradients and optimizer state (counted)
plus its traced activations are within 15% of the peak the CPU allocator reports for the same step (torch.profiler's
memory events), in fp32 and under bf16 autocast, for a GPT and a ViT."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model import GPT, GPTConfig, ViT, ViTConfig
from runtime import SavedBytes, autocast_ctx, kv_cache_bytes, static_bytes


def measured_step_peak(step):
    """Bytes allocated above the step's start at its peak (every allocation and free, from the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_plan_within_15_percent_of_the_measured_peak(kind, dtype):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, sequence_len=256))
        idx = torch.randint(0, 2048, (8, 257))
        loss_fn = lambda: model(idx[:, :-1], targets=idx[:, 1:])[1]  # noqa: E731
    else:
        model = ViT(ViTConfig(image_size=64, patch_size=4, n_layer=4, n_head=4, n_embd=192))
        images = torch.randn(16, 3, 64, 64)
        loss_fn = lambda: model(images).square().mean()  # noqa: E731
    ctx = autocast_ctx("cpu", dtype)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(counter=None):
        with ctx, (counter or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on, as in every step after the first
    counter = SavedBytes(model)
    step(counter)
    static = static_bytes(model, optimizer)
    plan = sum(static.values()) + counter.bytes
    measured = static["parameters"] + static["optimizer"] + measured_step_peak(step)
    assert counter.bytes > 0.5 * (measured - sum(static.values()))  # activations are most of what the step adds
    print(f"{kind} {dtype}: plan {plan / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, ratio {plan / measured:.3f}")
    assert abs(plan / measured - 1) < 0.15, (plan / 2**20, measured / 2**20)


def test_kv_cache_bytes_counts_keys_and_values():
    cfg = GPTConfig(vocab_size=64, n_layer=20, n_head=10, n_kv_head=5, n_embd=1280)
    assert kv_cache_bytes(cfg, batch=8, seq_len=2048, dtype_bytes=2) == 2 * 8 * 5 * 2048 * 128 * 20 * 2


def test_a_recipe_prints_its_plan_and_stops(tmp_path):
    from inprocess import run_script
    from test_recipes_ddp import RECIPES
    r = run_script("train_ocr.py", [*RECIPES["ocr"], "--plan=True", "--plan_gpu_gib=0.004", "--max_steps=50",
                                    "--log_interval=1", f"--out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("memory plan per process"))
    assert [line.split()[0] for line in lines[head + 1:head + 7]] == [
        "parameters", "gradients", "optimizer", "activations", "activations,", "eval"]
    import re
    # a 4 MiB "GPU" holds less than the batch of 16: the plan splits it into micro-batches that cover it
    micro, accum = map(int, re.search(r"micro-batch (\d+) x (\d+) accumulation steps", lines[head + 4]).groups())
    assert accum >= 2 and micro * accum >= 16 and micro * (accum - 1) < 16
    assert not [line for line in lines if line.startswith("step 3/")]  # two traced steps, then it stopped
