#!/usr/bin/env bash
# Issue 15 item 3: one study run sequentially and with --jobs 2 (1 thread per arm in both), then
# the two results compared: every arm row and summary row of report.json (run-specific fields such
# as the run folder and wall time left out) and every arm's predictions.csv, byte for byte.
# Needs an idle machine: a second job on the cores makes the speed-up measure the load.
# Usage: benchmarks/bench_study_jobs.sh [CONFIG] [OUT_DIR]
#   defaults: configs/v2/fewshot_openi_abd_vs_cxr64.yaml (21 arms), /tmp/bench_study_jobs
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/v2/fewshot_openi_abd_vs_cxr64.yaml}
OUT=${2:-/tmp/bench_study_jobs}
export OMP_NUM_THREADS=1
rm -rf "$OUT/seq" "$OUT/jobs2"
mkdir -p "$OUT"
echo "commit $(git rev-parse --short HEAD); CPU capability $(.venv/bin/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); $(nproc) CPUs"
echo "start $(date -u +%T) load average $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -v .venv/bin/openmednet study --config "$CONFIG" --set out="$OUT/seq" > "$OUT/seq.log" 2> "$OUT/seq.time"
echo "sequential done $(date -u +%T) load average $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -v .venv/bin/openmednet study --config "$CONFIG" --set out="$OUT/jobs2" --jobs 2 > "$OUT/jobs2.log" 2> "$OUT/jobs2.time"
echo "--jobs 2 done $(date -u +%T) load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E "Elapsed|Maximum resident|Percent of CPU" "$OUT/seq.time" "$OUT/jobs2.time"
.venv/bin/python - "$OUT" <<'PY'
import hashlib, json, pathlib, sys

out = pathlib.Path(sys.argv[1])
run_specific = {"run_dir", "wall_s", "time_s", "elapsed_s"}

def rows(run, key):
    report = json.loads((out / run / "report.json").read_text())
    return [{k: v for k, v in row.items() if k not in run_specific} for row in report.get(key, [])]

for key in ("arms", "summary"):
    a, b = rows("seq", key), rows("jobs2", key)
    print(f"report.json {key}: {len(a)} rows, {'identical' if a == b else 'DIFFERENT'}")

def predictions(run):
    root = out / run
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("predictions.csv")}

pa, pb = predictions("seq"), predictions("jobs2")
print(f"predictions.csv: {len(pa)} files, {'identical' if pa == pb else 'DIFFERENT'}")
PY
