#!/usr/bin/env bash
# Re-measure the README's results table on full MNIST (60,000 train / 10,000 test) with plain
# smolcluster commands: a server and 3 workers as processes on 127.0.0.1, batch 32 per worker.
#   scripts/mnist_results.sh [out-dir]          (default runs/mnist-results; ~30 min on 2 cores)
#   EPOCHS=1 ROWS="sync elastic" scripts/mnist_results.sh   (fewer epochs, some rows)
# Prints one Markdown row per run; every run's metrics stay in <out-dir>/<row>/metrics/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=${1:-runs/mnist-results}
epochs=${EPOCHS:-2}
mkdir -p "$out"
smolcluster data fetch --root "$out/data"

# past <metrics.jsonl> <fraction>: return once that worker is past the fraction of its steps.
past() {
  python - "$1" "$2" <<'PY'
import sys, time
from pathlib import Path
from smolcluster.events import read_records
path, frac = Path(sys.argv[1]), float(sys.argv[2])
total, step = None, 0
while total is None or step < frac * total:
    time.sleep(0.2)
    try:
        for e in read_records(path):  # a line still being written is left for the next pass
            total = e["total_steps"] if e["event"] == "start" else total
            step = e["step"] if e["event"] == "step" else step
    except FileNotFoundError:
        continue
print(f"{path}: past step {step} of {total}", file=sys.stderr)
PY
}

# row <name> <events|-> key=value... : configs, run, print the row. <events> is a comma list of
# join:<fraction> (a 4th worker, pi4, starts once mini2 is past that fraction of its steps) and
# kill:<fraction> (mini3 is killed once it is past that fraction of its own steps), in order.
row() {
  local name=$1 events=$2
  shift 2
  local dir="$out/$name" hosts=(mini2 mini3 pi5)
  [[ $events == *join:* ]] && hosts+=(pi4)
  rm -rf "$dir" && mkdir -p "$dir"
  python - "$dir" "$out/data" "$epochs" "${#hosts[@]}" "$@" <<'PY'
import sys, yaml
from pathlib import Path
from smolcluster.harness import LocalCluster
d, data, epochs, n, *pairs = sys.argv[1:]
extra = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
nn_keys = {"lr_schedule", "eval_steps", "max_steps"}
# Writes the two configs and the secret, as for the tests; workers mini2 mini3 pi5 (pi4);
# join_timeout_s: the trainer's default, not the tests' 120 s (full MNIST starts slowly).
cluster = {"step_timeout_s": 20.0, "join_timeout_s": 300.0}
LocalCluster(Path(d), Path(data).resolve(), int(n),
             cluster={**cluster, **{k: v for k, v in extra.items() if k not in nn_keys}},
             nn={"num_epochs": int(epochs), "eval_steps": 125, **{k: v for k, v in extra.items() if k in nn_keys}})
PY
  local args=(--cluster-config "$dir/cluster_config.yaml" --nn-config "$dir/nn_config.yaml")
  smolcluster server "${args[@]}" >"$dir/mini1.log" 2>&1 &
  local server=$! event
  declare -A pid=()
  for host in mini2 mini3 pi5; do
    smolcluster worker "${args[@]}" --host "$host" >"$dir/$host.log" 2>&1 &
    pid[$host]=$!
  done
  [ "$events" = - ] || for event in ${events//,/ }; do
    case $event in
      join:*) # pi4 starts now with torch imported and connects on the go file, so the join
        # happens at the chosen point and not some 10-30 s of Python start-up later.
        python - "$dir/go" "${args[@]}" --host pi4 >"$dir/pi4.log" 2>&1 <<'PY' &
import sys, time
from pathlib import Path
import smolcluster.worker, torch  # noqa: F401  (the slow imports, before the go)
from smolcluster.cli import main
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
sys.exit(main(["worker", *sys.argv[2:]]))
PY
        pid[pi4]=$!
        past "$dir/metrics/mini2.jsonl" "${event#join:}"
        touch "$dir/go" ;;
      kill:*) past "$dir/metrics/mini3.jsonl" "${event#kill:}"
        kill -9 "${pid[mini3]}" ;;
    esac
  done
  wait "$server"
  for host in "${!pid[@]}"; do wait "${pid[$host]}" || true; done
  if [ "$name" = sync ]; then  # the one-process baseline on the same samples and steps
    smolcluster local "${args[@]}" >"$dir/local.log" 2>&1
  fi
  python - "$dir" "$name" "$events" <<'PY'
import sys
from pathlib import Path
from smolcluster.events import of_kind, read_records
d, name, events = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
said = {"join": "pi4 joined at {:.0%}", "kill": "mini3 killed at {:.0%}"}
def summary(host):
    return of_kind(read_records(d / "metrics" / f"{host}.jsonl"), "summary")[0]
s = summary("mini1")
happened = [said[k].format(float(v)) for k, v in (e.split(":") for e in events.split(",") if ":" in e)]
merges = [e for e in of_kind(read_records(d / "metrics" / "mini1.jsonl"), "step") if e.get("host")]
if "join:" in events and merges:  # where the join really landed, from the server's own record
    first = next((i for i, e in enumerate(merges) if e["host"] == "pi4"), None)
    happened[0] += f" (first merge {first + 1} of {len(merges)})" if first is not None else " (never merged)"
cells = [", ".join([name, *happened]),
         str(s["steps"]) + (" merges" if s.get("mode") == "elastic" else ""),
         f"{s['final_accuracy']:.4f}"]
if name == "sync":
    import torch
    a = torch.load(d / "metrics" / "mini1-model.pt", weights_only=True)
    b = torch.load(d / "metrics" / "local-model.pt", weights_only=True)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    cells[-1] += f" (baseline {summary('local')['final_accuracy']:.4f}, max weight difference {worst:g})"
print("| " + " | ".join(cells) + " |", flush=True)
PY
}

rows=${ROWS:-sync sync-int8 sync-cosine sync-cosine-kill-early sync-cosine-kill sync-cosine-kill-late elastic elastic-kill elastic-join-kill}
echo "| run | steps | test accuracy |"
echo "|---|---|---|"
for name in $rows; do
  case $name in
    sync) row sync - ;;
    sync-int8) row sync-int8 - use_quantization=true ;;
    sync-cosine) row sync-cosine - lr_schedule=cosine ;;
    sync-cosine-kill-early) row sync-cosine-kill-early kill:0.1 lr_schedule=cosine ;;
    sync-cosine-kill) row sync-cosine-kill kill:0.4 lr_schedule=cosine ;;
    sync-cosine-kill-late) row sync-cosine-kill-late kill:0.8 lr_schedule=cosine ;;
    elastic) row elastic - mode=elastic lr_schedule=cosine push_interval=10 ;;
    elastic-kill) row elastic-kill kill:0.4 mode=elastic lr_schedule=cosine push_interval=10 ;;
    elastic-join-kill) row elastic-join-kill join:0.1,kill:0.4 mode=elastic lr_schedule=cosine \
      push_interval=10 min_workers=3 ;;
    *) echo "unknown row $name" >&2; exit 2 ;;
  esac
done
