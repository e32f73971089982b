"""
Speed on the current device, in one run:

  - measured matmul peak (fp32, and bf16 where the device supports it): the MFU denominator
  - GPT training tokens/s (forward + backward + AdamW step) and MFU against the measured peak of the same dtype
  - generation tokens/s at batch 1 with the KV cache and with full recomputation, and their ratio
  - peak memory of each phase (CUDA max_memory_allocated; on CPU the RSS high-water mark)
  - optionally (--compare_hf=True) the same shapes through transformers' LlamaForCausalLM (sdpa), with its
    SwiGLU width chosen so its non-embedding parameter count (and so its 6N FLOPs) equals ours, measured
    alternately with ours in this process (ours, theirs, ours, theirs, ... median of `rounds`), same dtype.
  - optionally (--breakdown=True, CPU) where a training step's time goes: matmuls, attention, everything else

    python bench.py                                   # CPU-sized GPT (6L x 384, 6/2 heads, seq 256, batch 8)
    python bench.py --compare_hf=True --json=out/bench.json
    python bench.py --compare_hf=True --breakdown=True  # + the profiled split of a step, and the ratio's ceiling
    python bench.py --preset=d20 --compile=True       # nanochat-d20 shapes; on CPU: params/FLOPs only (meta device)
"""
import json as _json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, InputError, gpt_flops_per_token
from runtime import (autocast_ctx, configure_optimizers, install_error_hook, maybe_compile, measure_matmul_peak,
                     resolve_device, sync)

# -----------------------------------------------------------------------------
# config (python bench.py --help lists these)
preset = "cpu"          # 'cpu': 6L x 384, 6 heads / 2 kv heads, vocab 8192, seq 256, batch 8 | 'd20': nanochat d20
n_layer = 0             # 0: the preset's value (the same for the five shape keys below)
n_embd = 0
n_head = 0
n_kv_head = 0
vocab_size = 0
seq_len = 0
batch_size = 0
device = "auto"         # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "auto"          # 'auto' (bf16 on CUDA, fp32 on CPU) | 'float32' | 'bfloat16' (autocast, both models alike)
compile = False         # torch.compile the training step (inductor, any device; HF is compiled alike)
warmup = 1              # untimed training steps per model before the first round
steps = 2               # timed training steps per round
rounds = 5              # training rounds; the median is reported (ours, HF, ours, HF, ... with compare_hf)
gen_rounds = 3          # generation rounds (each: ours cached, HF cached, ours recomputed); median reported
gen_tokens = 256        # new tokens per generation (greedy, batch 1)
prompt_len = 16         # random prompt tokens before generation
recompute = True        # also time generation without the KV cache (slow: a full forward per token)
peak_seconds = 1.0      # time spent measuring each matmul peak
matmul_n = 0            # matmul size for the peak; 0: 1024 on CPU, 8192 on CUDA
compare_hf = False      # also run transformers' LlamaForCausalLM at the same shapes (needs `pip install transformers`)
breakdown = False       # also profile one training step per model (torch.profiler, CPU only): its time in matmuls,
                        #   attention and everything else, and the train ratio's ceiling were everything else free
json = ""               # path: also write the results as JSON
seed = 1337
# -----------------------------------------------------------------------------

PRESETS = {
    "cpu": dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=2, vocab_size=8192, seq_len=256, batch_size=8),
    # nanochat d20: depth 20, width 64 * 20, heads of 128, vocab 2^16, seq 2048 (nanochat runs batch 32 per H100)
    "d20": dict(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10, vocab_size=65536, seq_len=2048, batch_size=16),
}
TARGETS = dict(kv_speedup=5.0, train_vs_hf=1.15, gen_vs_hf=1.5)


# -----------------------------------------------------------------------------
# memory: peak of one phase


def reset_peak_memory(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:  # Linux: '5' resets the RSS high-water mark (VmHWM, which getrusage's ru_maxrss reads)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the number below is the process-wide high-water mark


def peak_memory_mib(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def bf16_supported(dev):
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -----------------------------------------------------------------------------
# models


def gpt_config(shape):
    # the rotary table covers 4x sequence_len: make it long enough for prompt + generation too
    need = -(-(prompt_len + gen_tokens) // 4)
    return GPTConfig(vocab_size=shape["vocab_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
                     n_kv_head=shape["n_kv_head"], n_embd=shape["n_embd"],
                     sequence_len=max(shape["seq_len"], need))


def flops_per_token(cfg, n_params, seq):
    """Training FLOPs per token at sequence length `seq` (6N + attention), N = matmul params (no wte)."""
    return gpt_flops_per_token(GPTConfig(**{**cfg.__dict__, "sequence_len": seq}), n_params)


def hf_intermediate_size(shape):
    """SwiGLU has 3 matrices of C x I where our relu^2 MLP has 2 of C x 4C: I = 8C/3 equalises parameters."""
    return round(8 * shape["n_embd"] / 3)


def hf_llama(shape, seq):
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None, "transformers is not installed (pip install transformers): HF comparison skipped"
    transformers.logging.set_verbosity_error()
    C = shape["n_embd"]
    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=C, intermediate_size=hf_intermediate_size(shape),
                      num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
                      num_key_value_heads=shape["n_kv_head"], head_dim=C // shape["n_head"],
                      max_position_embeddings=4 * seq, tie_word_embeddings=False, attention_bias=False,
                      mlp_bias=False, hidden_act="silu", attn_implementation="sdpa", use_cache=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (LlamaForCausalLM, cfg), f"transformers {transformers.__version__}"


def count_params(model, embedding):
    total = sum(p.numel() for p in model.parameters())
    return total, total - embedding.weight.numel()  # non-embedding: everything but the input lookup table


# -----------------------------------------------------------------------------
# measurements


def time_train(model, opt, loss_fn, x, y, n, ctx, dev):
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        with ctx:
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    return time.perf_counter() - t0


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def step_time_shares(model, opt, loss_fn, x, y, ctx, dev):
    """Shares of one training step's self CPU time (torch.profiler) in matmuls, attention (SDPA's kernels,
    forward and backward) and everything else (norms, rotary, activations, loss, optimizer, autograd)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_train(model, opt, loss_fn, x, y, 1, ctx, dev)
    spent = dict(matmul=0.0, attention=0.0, other=0.0)
    for e in prof.key_averages():
        kind = "matmul" if e.key in MATMUL_OPS else "attention" if "scaled_dot_product" in e.key else "other"
        spent[kind] += e.self_cpu_time_total
    total = sum(spent.values())
    return {k: v / total for k, v in spent.items()}


def time_generate(fn, ctx, dev):
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def ours_generate(model, prompt, n, use_cache):
    return lambda: model.generate(prompt, n, use_cache=use_cache)


def hf_generate(model, prompt, n):
    attn = torch.ones_like(prompt)
    return lambda: model.generate(input_ids=prompt, attention_mask=attn, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=0)[:, prompt.shape[1]:]


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a and b else None


# -----------------------------------------------------------------------------
# the run


def run(cfg):
    torch.manual_seed(cfg["seed"])
    dev = torch.device(resolve_device(cfg["device"]))
    if cfg["preset"] not in PRESETS:
        raise InputError(f"preset must be one of {sorted(PRESETS)}, got {cfg['preset']!r}")
    shape = {k: (cfg[k] or v) for k, v in PRESETS[cfg["preset"]].items()}
    ctx_factory = lambda: autocast_ctx(dev.type, cfg["dtype"])[0]  # noqa: E731 (a fresh context per use)
    _, dt_name = autocast_ctx(dev.type, cfg["dtype"])
    meta_only = cfg["preset"] == "d20" and dev.type == "cpu"
    seq, B = shape["seq_len"], shape["batch_size"]
    res = dict(device=str(dev), device_name=device_name(dev), torch=torch.__version__, dtype=dt_name,
               compile=bool(cfg["compile"]), load_average_before=load_average(),
               shape=shape, config=cfg, notes=[], ours={}, hf=None, ratios={}, targets=[])
    notes = res["notes"]

    # matmul peak, per dtype
    n = cfg["matmul_n"] or (8192 if dev.type == "cuda" else 1024)
    peaks = {"float32": measure_matmul_peak(dev, torch.float32, n=n, seconds=cfg["peak_seconds"])}
    if bf16_supported(dev):
        peaks["bfloat16"] = measure_matmul_peak(dev, torch.bfloat16, n=n, seconds=cfg["peak_seconds"])
    else:
        notes.append("bf16 matmul is not supported natively on this device: no bf16 peak")
    res["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
    res["matmul_n"] = n
    peak = peaks.get(dt_name)

    # models (on the meta device when the shapes are only counted)
    gcfg = gpt_config(shape)
    build_dev = torch.device("meta") if meta_only else dev
    with torch.device(build_dev):
        ours = GPT(gcfg)
    o_total, o_nonemb = count_params(ours, ours.transformer.wte)
    ours_fpt = flops_per_token(gcfg, o_nonemb, seq)
    res["ours"].update(params=o_total, params_non_embedding=o_nonemb, flops_per_token=ours_fpt)

    hf = None
    if cfg["compare_hf"]:
        spec, msg = hf_llama(shape, max(seq, gcfg.sequence_len))
        notes.append(msg)
        if spec is not None:
            cls, hcfg = spec
            with torch.device(build_dev):
                hf = cls(hcfg)
            h_total, h_nonemb = count_params(hf, hf.get_input_embeddings())
            res["hf"] = dict(params=h_total, params_non_embedding=h_nonemb, intermediate_size=hcfg.intermediate_size,
                             flops_per_token=flops_per_token(gcfg, h_nonemb, seq))
    if meta_only:
        notes.append(f"preset {cfg['preset']} on CPU: parameters and FLOPs counted on the meta device; "
                     "throughput needs CUDA")
        return finish(res)

    if cfg["compare_hf"] and hf is None:
        pass  # transformers missing: note already recorded
    models = [("ours", ours, ours_loss)] + ([("hf", hf, hf_loss)] if hf is not None else [])

    # training: forward + backward + AdamW step, alternating between models round by round
    g = torch.Generator().manual_seed(cfg["seed"])
    data = torch.randint(0, shape["vocab_size"], (B, seq + 1), generator=g).to(dev)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    train = {}
    for name, model, loss_fn in models:
        model.train()
        opt = configure_optimizers(model, lr=1e-4, device_type=dev.type)
        step_model = maybe_compile(model, cfg["compile"], dev.type)
        reset_peak_memory(dev)
        if cfg["warmup"]:
            time_train(step_model, opt, loss_fn, x, y, cfg["warmup"], ctx_factory(), dev)
        train[name] = dict(model=step_model, opt=opt, loss_fn=loss_fn, times=[],
                           mem=peak_memory_mib(dev) if cfg["warmup"] else None)
    for _ in range(cfg["rounds"]):
        for name, t in train.items():
            reset_peak_memory(dev)
            t["times"].append(time_train(t["model"], t["opt"], t["loss_fn"], x, y, cfg["steps"], ctx_factory(), dev))
            t["mem"] = max(t["mem"] or 0, peak_memory_mib(dev))
    if cfg["breakdown"] and dev.type != "cpu":
        notes.append("breakdown=True is CPU only (it reads torch.profiler's CPU times): skipped")
    for name, t in train.items():
        side = res[name]
        tok_s = [cfg["steps"] * B * seq / s for s in t["times"]]
        side.update(train_tok_s=median(tok_s), train_tok_s_best=max(tok_s), train_tok_s_rounds=tok_s,
                    train_peak_mem_mib=t["mem"])
        side["train_mfu"] = side["train_tok_s"] * side["flops_per_token"] / peak if peak else None
        if cfg["breakdown"] and dev.type == "cpu":
            shares = step_time_shares(t["model"], t["opt"], t["loss_fn"], x, y, ctx_factory(), dev)
            # 6N of the FLOPs are matmuls (the attention's are SDPA's): their rate inside the training step
            matmul_seconds = shares["matmul"] * B * seq / side["train_tok_s"]
            side.update(train_shares=shares,
                        train_matmul_gflops=6 * side["params_non_embedding"] * B * seq / matmul_seconds / 1e9)
        t["opt"].zero_grad(set_to_none=True)
    del train  # optimizer state goes before generation is measured

    # generation at batch 1: greedy, gen_tokens new tokens after a random prompt
    prompt = torch.randint(0, shape["vocab_size"], (1, cfg["prompt_len"]), generator=g).to(dev)
    N = cfg["gen_tokens"]
    runs = [("ours", "gen_cached", ours_generate(ours, prompt, N, True), ours_generate(ours, prompt, 4, True))]
    if hf is not None:
        runs.append(("hf", "gen_cached", hf_generate(hf, prompt, N), hf_generate(hf, prompt, 4)))
    if cfg["recompute"]:
        runs.append(("ours", "gen_recompute", ours_generate(ours, prompt, N, False),
                     ours_generate(ours, prompt, 4, False)))
    for _, _, _, warm in runs:
        for m in (ours, hf):
            if m is not None:
                m.eval()
        time_generate(warm, ctx_factory(), dev)
    gen, outs = {}, {}
    for _ in range(cfg["gen_rounds"]):
        for name, key, fn, _ in runs:
            reset_peak_memory(dev)
            secs, out = time_generate(fn, ctx_factory(), dev)
            if out.shape[1] != N:
                raise RuntimeError(f"{name} {key} generated {out.shape[1]} tokens, expected {N}")
            gen.setdefault((name, key), []).append(N / secs)
            res[name][key + "_peak_mem_mib"] = max(res[name].get(key + "_peak_mem_mib", 0), peak_memory_mib(dev))
            outs[(name, key)] = out
    for (name, key), tok_s in gen.items():
        res[name][key + "_tok_s"] = median(tok_s)
        res[name][key + "_tok_s_best"] = max(tok_s)
        res[name][key + "_tok_s_rounds"] = tok_s
    if ("ours", "gen_recompute") in outs:
        a, b = outs[("ours", "gen_cached")], outs[("ours", "gen_recompute")]
        res["ours"]["cache_matches_recompute"] = float((a == b).float().mean())
    res["ours"]["kv_speedup"] = ratio(res["ours"].get("gen_cached_tok_s"), res["ours"].get("gen_recompute_tok_s"))
    return finish(res)


def finish(res):
    o, h = res["ours"], res["hf"] or {}
    res["ratios"] = dict(train_vs_hf=ratio(o.get("train_tok_s"), h.get("train_tok_s")),
                         gen_vs_hf=ratio(o.get("gen_cached_tok_s"), h.get("gen_cached_tok_s")),
                         kv_speedup=o.get("kv_speedup"))
    if res["ratios"]["train_vs_hf"] and o.get("train_shares"):
        # were our step nothing but its matmuls and attention, at the speed they ran, against the peer as measured
        s = o["train_shares"]
        res["ratios"]["train_vs_hf_ceiling"] = res["ratios"]["train_vs_hf"] / (s["matmul"] + s["attention"])
    # best-of-rounds ratios: on a shared, loaded machine the fastest round is the least disturbed one
    res["ratios_best_round"] = dict(train_vs_hf=ratio(o.get("train_tok_s_best"), h.get("train_tok_s_best")),
                                    gen_vs_hf=ratio(o.get("gen_cached_tok_s_best"), h.get("gen_cached_tok_s_best")),
                                    kv_speedup=ratio(o.get("gen_cached_tok_s_best"), o.get("gen_recompute_tok_s_best")))
    descr = dict(kv_speedup=f"KV-cache generation >= {TARGETS['kv_speedup']}x recomputation",
                 train_vs_hf=f"training tok/s >= {TARGETS['train_vs_hf']}x HF Llama ({res['dtype']} both)",
                 gen_vs_hf=f"cached generation >= {TARGETS['gen_vs_hf']}x HF generate")
    for key, threshold in TARGETS.items():
        value = res["ratios"][key]
        res["targets"].append(dict(name=key, target=descr[key], threshold=threshold, value=value,
                                   met=None if value is None else bool(value >= threshold)))
    res["load_average_after"] = load_average()
    loads = [l[0] for l in (res["load_average_before"], res["load_average_after"]) if l]
    if loads and max(loads) > (os.cpu_count() or 1):
        res["notes"].append(f"load average {max(loads)} exceeds the {os.cpu_count()} CPUs: other processes share "
                            "this machine, so the timings are slowed and noisy (the ratios, measured alternately, "
                            "less so)")
    res["table"] = table_rows(res)
    return res


# -----------------------------------------------------------------------------
# printing


def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "M":
        return f"{v / 1e6:,.2f}M"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "frac":
        return f"{v:.2f}"
    return f"{v:,.1f}"


def table_rows(res):
    o, h, r = res["ours"], res["hf"] or {}, res["ratios"]
    dt = res["dtype"]
    rows = [(f"matmul peak {k} (GFLOP/s, n={res['matmul_n']})", fmt(v, "f"), "", "")
            for k, v in res["matmul_peak_gflops"].items()]
    rows += [
        ("params total", fmt(o["params"], "M"), fmt(h.get("params"), "M"), ""),
        ("params non-embedding (lm_head included)", fmt(o["params_non_embedding"], "M"),
         fmt(h.get("params_non_embedding"), "M"), ""),
        ("train FLOPs/token (6N + attention)", fmt(o["flops_per_token"], "M"), fmt(h.get("flops_per_token"), "M"), ""),
        (f"train tok/s (fwd+bwd+AdamW, {dt})", fmt(o.get("train_tok_s"), "int"), fmt(h.get("train_tok_s"), "int"),
         fmt(r.get("train_vs_hf"), "x")),
        (f"train MFU vs {dt} matmul peak", fmt(o.get("train_mfu"), "pct"), fmt(h.get("train_mfu"), "pct"), ""),
        *breakdown_rows(o, h, r),
        ("train peak memory (MiB)", fmt(o.get("train_peak_mem_mib"), "int"), fmt(h.get("train_peak_mem_mib"), "int"), ""),
        ("generate tok/s, KV cache (batch 1)", fmt(o.get("gen_cached_tok_s"), "f"), fmt(h.get("gen_cached_tok_s"), "f"),
         fmt(r.get("gen_vs_hf"), "x")),
        ("generate tok/s, full recomputation", fmt(o.get("gen_recompute_tok_s"), "f"), "", ""),
        ("KV cache speedup over recomputation", fmt(o.get("kv_speedup"), "x"), "", ""),
        ("generate peak memory, KV cache (MiB)", fmt(o.get("gen_cached_peak_mem_mib"), "int"),
         fmt(h.get("gen_cached_peak_mem_mib"), "int"), ""),
        ("generate peak memory, recompute (MiB)", fmt(o.get("gen_recompute_peak_mem_mib"), "int"), "", ""),
        ("cached == recomputed tokens (fraction)", fmt(o.get("cache_matches_recompute"), "frac"), "", ""),
    ]
    return [list(row) for row in rows]


def shares_text(side):
    shares = side.get("train_shares")
    return " / ".join(fmt(shares[k], "pct") for k in ("matmul", "attention", "other")) if shares else "-"


def breakdown_rows(o, h, r):
    if not o.get("train_shares"):
        return []
    return [("train step time: matmul / attention / other", shares_text(o), shares_text(h), ""),
            ("train matmul GFLOP/s (6N FLOPs / matmul time)", fmt(o["train_matmul_gflops"], "f"),
             fmt(h.get("train_matmul_gflops"), "f"), ""),
            ("train ratio were 'other' free (ceiling)", "", "", fmt(r.get("train_vs_hf_ceiling"), "x"))]


def print_report(res, cfg):
    s = res["shape"]
    print(f"bench: {res['device']} ({res['device_name']}), torch {res['torch']}, dtype {res['dtype']}, "
          f"compile {'on' if res['compile'] else 'off'}, load average {res['load_average_before']}")
    print(f"shapes: preset {cfg['preset']}: {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads / "
          f"{s['n_kv_head']} kv heads, vocab {s['vocab_size']}, seq {s['seq_len']}, batch {s['batch_size']}; "
          f"train {cfg['steps']} steps x {cfg['rounds']} rounds (median); generate x {cfg['gen_rounds']}: {cfg['gen_tokens']} new tokens "
          f"after a {cfg['prompt_len']}-token prompt")
    if res["hf"]:
        print(f"peer: transformers LlamaForCausalLM (sdpa), SwiGLU intermediate_size {res['hf']['intermediate_size']} "
              f"(= 8/3 x {s['n_embd']}: non-embedding params match our relu^2 MLP's 2 x 4C), measured alternately")
    header = ("metric", "ours (GPT)", "HF Llama" if res["hf"] else "", "ratio" if res["hf"] else "")
    rows = [header] + [tuple(r) for r in res["table"]]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 6))
    print("targets:")
    for t in res["targets"]:
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        value = "-" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {t['target']}: {value}  {state}")
    best = {k: f"{v:.2f}x" for k, v in res["ratios_best_round"].items() if v is not None}
    if best:
        print(f"  (best round against best round: {', '.join(f'{k} {v}' for k, v in best.items())})")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"load average after: {res['load_average_after']}")


def main(cfg):
    res = run(cfg)
    print_report(res, cfg)
    if cfg["json"]:
        d = os.path.dirname(cfg["json"])
        if d:
            os.makedirs(d, exist_ok=True)
        with open(cfg["json"], "w") as f:
            _json.dump(res, f, indent=1, default=str)
        print(f"wrote {cfg['json']}")
    return res


if __name__ == "__main__":
    install_error_hook()
    from configurator import configure
    config = configure(globals())
    main(config)
