"""
One command that checks the GPU path on whatever GPUs are visible, in a few minutes:

    python gpu_check.py                 # every recipe's GPU config, ~20 steps, bf16 + compile, under torchrun
    python gpu_check.py --recipes=ocr,lanelm --steps=10

Each recipe runs its GPU config (config/<recipe>_<dataset>.py: the real shapes) on its synthetic data (the GPU
machine needs no dataset, no download), then bench.py at nanochat-d20 shapes (compile + bf16: MFU against the
measured bf16 matmul peak and against the card's datasheet peak) with its KV-cache check. One table at the end.
Without a CUDA GPU it says so in one line and exits 0.
"""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))

# each recipe's GPU config, switched to its synthetic data and to small evals; pretrained sources are dropped
# (the GPU machine may have no network) and replaced by random weights of the same shapes (nanochat d20 for OCR,
# SmolLM2-135M's depth and width for Foveated)
RECIPES = {
    "lanelm": ["config/lanelm_tusimple.py", "--dataset=synthetic", "--n_eval=64", "--n_eval_tf=32", "--eval_batch=32"],
    "pointer": ["config/pointer_jsonl.py", "--dataset=synthetic", "--vit_init=", "--n_eval=64", "--n_eval_multi=16",
                "--n_train_eval=16", "--num_workers=0"],
    "ocr": ["config/ocr_fox.py", "--dataset=synthetic", "--n_eval=8", "--eval_batch=8", "--init_gpt=",
            "--init_encoder=", "--n_layer=20", "--n_head=10", "--n_kv_head=10", "--n_embd=1280"],
    "seg_gumbel": ["config/seg_refcoco.py", "--dataset=synthetic", "--vit_init=", "--stage_a_steps=10", "--n_eval=64",
                   "--eval_batch_size=64"],
    "foveated": ["config/foveated_video.py", "--task=track", "--latent_encoder=fixed", "--vit_init=", "--init_gpt=",
                 "--n_layer=30", "--n_head=9", "--n_embd=576", "--freeze_vit=False", "--n_eval=64", "--eval_batch=32",
                 "--n_caption_eval=8"],
}
# dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([-\d.]+) .*?\| ([\d.]+)k tok/s(?: \| mfu (\d+)%)?"
                       r"(?: \| mem ([\d.]+) GiB)?", re.M)

# config (python gpu_check.py --help)
recipes = "lanelm,pointer,ocr,seg_gumbel,foveated"
steps = 20
timeout = 150            # seconds per recipe (compile included)
out_dir = "out/gpu_check"


def datasheet_peak(name):
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def last_step(text):
    """(step, loss, tok/s, mfu %, GiB) of the last step line, or None."""
    rows = STEP_LINE.findall(text)
    if not rows:
        return None
    step, loss, ktok, mfu, mem = rows[-1]
    return int(step), float(loss), float(ktok) * 1000, int(mfu) if mfu else None, float(mem) if mem else None


def run_recipe(recipe, n_gpu):
    args = [*RECIPES[recipe], f"--max_steps={steps}", "--log_interval=5", f"--eval_interval={steps}",
            "--dtype=bfloat16", "--compile=True", "--max_train_seconds=0", "--wandb_log=False",
            f"--out_dir={os.path.join(out_dir, recipe)}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpu}",
           f"train_{recipe}.py", *args]
    env = dict(os.environ, TORCH_LOGS="recompiles", OMP_NUM_THREADS="1")
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, text = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
    with open(os.path.join(out_dir, f"{recipe}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + text)
    row = dict(recipe=recipe, exit=code, seconds=round(time.time() - t0), recompiles=text.count("Recompiling function"))
    found = last_step(text)
    if found:
        row.update(zip(("step", "loss", "tok_s", "mfu", "peak_gib"), found))
    return row


def run_bench(card):
    path = os.path.join(out_dir, "bench_d20.json")
    cmd = [sys.executable, "bench.py", "--preset=d20", "--compile=True", "--dtype=bfloat16", "--rounds=3",
           "--gen_rounds=1", f"--json={path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout * 2)
    with open(os.path.join(out_dir, "bench_d20.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        return dict(exit=r.returncode)
    with open(path) as f:
        ours = json.load(f)["ours"]
    peak = datasheet_peak(card)
    flops = ours["train_tok_s"] * ours["flops_per_token"]
    return dict(exit=0, tok_s=round(ours["train_tok_s"]), mfu_measured=round(100 * ours["train_mfu"], 1),
                mfu_datasheet=round(100 * flops / peak, 1) if peak else None,
                kv_speedup=ours.get("kv_speedup"), cache_matches=ours.get("cache_matches_recompute"))


def main():
    import torch
    from configurator import configure
    cfg = configure(globals())
    globals().update(cfg)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}); nothing to check")
        return 0
    n_gpu, card = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    os.makedirs(out_dir, exist_ok=True)
    print(f"gpu_check: {n_gpu} x {card}, torch {torch.__version__}")
    rows = []
    for recipe in cfg["recipes"].split(","):
        if recipe not in RECIPES:
            print(f"unknown recipe {recipe!r}: one of {sorted(RECIPES)}")
            return 2
        rows.append(run_recipe(recipe, n_gpu))
        print(json.dumps(rows[-1]), flush=True)
    bench = run_bench(card)
    print(json.dumps(dict(bench_d20=bench)))
    print("\n| recipe | exit | steps | loss | tok/s | MFU (measured peak) | peak GiB | recompiles | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['exit']} | {r.get('step', '-')} | {r.get('loss', '-')} | {r.get('tok_s', '-')} | "
              f"{r.get('mfu', '-')} | {r.get('peak_gib', '-')} | {r['recompiles']} | {r['seconds']} |")
    print(f"\nbench d20 (compile + bf16): {bench}")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(card=card, n_gpu=n_gpu, recipes=rows, bench_d20=bench), f, indent=1)
    return 0 if all(r["exit"] == 0 for r in rows) and bench.get("exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
