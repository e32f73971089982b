"""bench.py end to end at tiny shapes: the table and the JSON carry every field, all positive (no timing asserts)."""
import json
import os
import subprocess
import sys

import pytest

import bench
from configurator import config_keys, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--vocab_size=256", "--seq_len=32",
        "--batch_size=2", "--warmup=1", "--steps=1", "--rounds=1", "--gen_rounds=1", "--gen_tokens=8",
        "--prompt_len=4", "--peak_seconds=0.05", "--matmul_n=128", "--device=cpu", "--dtype=float32"]


def run_in_process(*extra):
    """bench.main with the script's own defaults and command-line parsing, without a subprocess."""
    return bench.main(parse_args(config_keys(vars(bench)), [*TINY, *extra]))


def check_ours(res):
    ours = res["ours"]
    for key in ("params", "params_non_embedding", "flops_per_token", "train_tok_s", "train_mfu", "train_peak_mem_mib",
                "gen_cached_tok_s", "gen_recompute_tok_s", "kv_speedup", "gen_cached_peak_mem_mib"):
        assert ours[key] is not None and ours[key] > 0, key
    assert ours["cache_matches_recompute"] == 1.0  # fp32 greedy: the cached tokens are the recomputed ones
    assert ours["params"] > ours["params_non_embedding"]
    assert res["matmul_peak_gflops"]["float32"] > 0
    assert {t["name"] for t in res["targets"]} == {"kv_speedup", "train_vs_hf", "gen_vs_hf"}
    kv = next(t for t in res["targets"] if t["name"] == "kv_speedup")
    assert kv["value"] > 0 and kv["met"] in (True, False)
    assert res["table"] and all(len(row) == 4 for row in res["table"])


def test_bench_cli_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", *TINY, f"--json={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("matmul peak float32", "train tok/s", "train MFU", "train peak memory", "KV cache (batch 1)",
                  "full recomputation", "KV cache speedup", "targets:", "load average"):
        assert label in proc.stdout, label
    res = json.loads(out.read_text())
    check_ours(res)
    assert res["hf"] is None  # not asked for


def test_bench_d20_counts_on_meta_device(capsys):
    # d20 shapes on CPU: params and FLOPs/token from the meta device, no allocation, no throughput
    res = run_in_process("--preset=d20", "--n_layer=0", "--n_embd=0", "--n_head=0", "--n_kv_head=0",
                         "--vocab_size=0", "--seq_len=0", "--batch_size=0")
    ours = res["ours"]
    assert 500e6 < ours["params"] < 600e6  # nanochat d20: ~561M
    assert ours["flops_per_token"] > 6 * ours["params_non_embedding"]
    assert ours.get("train_tok_s") is None
    assert "meta device" in capsys.readouterr().out


def test_bench_breakdown_splits_the_step(capsys):
    # one profiled step: its self CPU time split three ways, the matmuls' own rate, and no ceiling without a peer
    res = run_in_process("--breakdown=True", "--recompute=False")
    shares = res["ours"]["train_shares"]
    assert set(shares) == {"matmul", "attention", "other"}
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert shares["matmul"] > 0 and shares["attention"] > 0 and shares["other"] > 0
    assert res["ours"]["train_matmul_gflops"] > 0
    assert "train_vs_hf_ceiling" not in res["ratios"]
    assert "matmul / attention / other" in capsys.readouterr().out


def test_bench_compare_hf(capsys):
    res = run_in_process("--compare_hf=True", "--breakdown=True")
    check_ours(res)
    hf = res["hf"]
    for key in ("params", "params_non_embedding", "train_tok_s", "train_mfu", "gen_cached_tok_s"):
        assert hf[key] > 0, key
    # the SwiGLU width makes the non-embedding parameter counts equal (to within rounding of 8C/3)
    assert abs(hf["params_non_embedding"] - res["ours"]["params_non_embedding"]) < 0.01 * hf["params_non_embedding"]
    assert res["ratios"]["train_vs_hf"] > 0 and res["ratios"]["gen_vs_hf"] > 0
    # the ceiling: our step cut to its matmul + attention time, against the peer's whole step
    s = res["ours"]["train_shares"]
    ceiling = res["ratios"]["train_vs_hf"] / (s["matmul"] + s["attention"])
    assert res["ratios"]["train_vs_hf_ceiling"] == pytest.approx(ceiling)
    assert 0 < hf["train_shares"]["matmul"] < 1
    assert "HF Llama" in capsys.readouterr().out


def test_bench_compare_hf_without_transformers(monkeypatch, capsys):
    # transformers is optional: compare_hf=True without it still benchmarks ours and says why HF is missing
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    res = run_in_process("--compare_hf=True")
    check_ours(res)
    assert res["hf"] is None
    assert next(t for t in res["targets"] if t["name"] == "train_vs_hf")["met"] is None
    assert "transformers is not installed" in capsys.readouterr().out
