#!/usr/bin/env bash
# Fresh machine -> tests -> every recipe on its default -> report.md (+ bench.py's table).
#   bash speedrun.sh                  # everything, on whatever this machine has
#   RECIPES="lanelm ocr" bash speedrun.sh
#   NPROC_PER_NODE=8 bash speedrun.sh # defaults to the number of visible GPUs (1 process on CPU)
#   EXTRA_ARGS="--max_steps=50" BENCH_ARGS="--rounds=1" REPORT=out/r.md SKIP_TESTS=1 SKIP_INSTALL=1 NO_VENV=1 ...
# Stops with a non-zero exit and names the recipe if one fails.
set -euo pipefail
cd "$(dirname "$0")"

RECIPES=${RECIPES:-"lanelm pointer ocr seg_gumbel foveated"}
SKIP_TESTS=${SKIP_TESTS:-0}
EXTRA_ARGS=${EXTRA_ARGS:-}   # appended to every recipe's command line (word-split)
BENCH_ARGS=${BENCH_ARGS:-}
REPORT=${REPORT:-report.md}
RUN_ROOT=${RUN_ROOT:-out/speedrun-$(date +%Y%m%d-%H%M%S)}

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${NO_VENV:-0}" != "1" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
[ "${SKIP_INSTALL:-0}" = "1" ] || python -m pip install -q -r requirements-test.txt

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( NGPU > 0 ? NGPU : 1 ))}
echo "speedrun: recipes [$RECIPES], $NPROC_PER_NODE process(es) per recipe, outputs in $RUN_ROOT"

if [ "$SKIP_TESTS" != "1" ]; then
  python -m pytest -q || { echo "speedrun: the tests failed; not running the recipes"; exit 1; }
fi

mkdir -p "$RUN_ROOT"
for recipe in $RECIPES; do
  script=train_${recipe}.py
  [ -f "$script" ] || { echo "speedrun: no $script"; exit 1; }
  echo "== $recipe =="
  if [ "$NPROC_PER_NODE" -gt 1 ]; then
    launch=(torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" "$script")
  else
    launch=(python "$script")
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  if ! "${launch[@]}" --out_dir="$RUN_ROOT/$recipe" $EXTRA_ARGS 2>&1 | tee "$RUN_ROOT/$recipe.log"; then
    echo "speedrun: recipe '$recipe' failed; its log is $RUN_ROOT/$recipe.log"; exit 1
  fi
  echo $(( $(date +%s) - start )) > "$RUN_ROOT/$recipe.wall_seconds"
done

echo "== bench =="
# shellcheck disable=SC2086
python bench.py --json="$RUN_ROOT/bench.json" $BENCH_ARGS | tee "$RUN_ROOT/bench.log" || { echo "speedrun: bench.py failed"; exit 1; }

python - "$RUN_ROOT" "$REPORT" $RECIPES <<'EOF'
import json, os, platform, re, statistics, sys, time
root, report, recipes = sys.argv[1], sys.argv[2], sys.argv[3:]
lines = [f"# Speedrun report", "", f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
         f"({os.cpu_count()} CPUs); outputs in `{root}`", "",
         "| recipe | metrics (measured vs target) | met | steps | wall | device | dtype | params | train tok/s |",
         "|---|---|---|---|---|---|---|---|---|"]
for r in recipes:
    res = json.load(open(os.path.join(root, r, "results.json")))
    wall = open(os.path.join(root, f"{r}.wall_seconds")).read().strip()
    parts = []
    for k, v in res["metrics"].items():
        if k in res["targets"]:
            op, thr = res["targets"][k]
            parts.append(f"{k} **{v:.4g}** ({op} {thr})")
    metrics = "; ".join(parts) or "-"
    # training throughput: the median of the "N.Nk tok/s" fields of model.log_line in the recipe's log
    rates = [float(x) for x in re.findall(r"\| ([\d.]+)k tok/s", open(os.path.join(root, f"{r}.log")).read())]
    tok_s = f"{1000 * statistics.median(rates):,.0f}" if rates else "-"
    lines.append(f"| {r} | {metrics} | {'yes' if res['met'] else '**no**'} | {res.get('step', '-')} | {int(wall) / 60:.1f} min "
                 f"| {res.get('device')} | {res.get('dtype')} | {res.get('params', 0) / 1e6:.2f}M | {tok_s} |")
lines += ["", "## bench.py", "", "```", open(os.path.join(root, "bench.log")).read().strip(), "```", ""]
open(report, "w").write("\n".join(lines))
print("\n".join(lines))
EOF
echo "speedrun: wrote $REPORT"
