#!/usr/bin/env bash
# Re-measure the README's results table on full MNIST (60,000 train / 10,000 test) with plain
# smolcluster commands: a server and 3 workers as processes on 127.0.0.1, batch 32 per worker.
#   scripts/mnist_results.sh [out-dir]          (default runs/mnist-results; ~20 min on 2 cores)
#   EPOCHS=1 ROWS="sync elastic" scripts/mnist_results.sh   (fewer epochs, some rows)
# Prints one Markdown row per run; every run's metrics stay in <out-dir>/<row>/metrics/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=${1:-runs/mnist-results}
epochs=${EPOCHS:-2}
mkdir -p "$out"
smolcluster data fetch --root "$out/data"

# row <name> <kill-worker-at-fraction|-> key=value... : configs, run, print the row.
row() {
  local name=$1 kill_at=$2
  shift 2
  local dir="$out/$name"
  rm -rf "$dir" && mkdir -p "$dir"
  python - "$dir" "$out/data" "$epochs" "$@" <<'PY'
import socket, sys, yaml
from pathlib import Path
from smolcluster.protocol import write_secret
d, data, epochs, *pairs = sys.argv[1:]
extra = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
nn_keys = {"lr_schedule", "eval_steps", "max_steps"}
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
workers = ["mini2", "mini3", "pi5"]
cluster = {"host_ip": dict.fromkeys(["mini1", *workers], "127.0.0.1"), "port": port,
           "num_workers": 3, "workers": workers, "server": "mini1", "seed": 42,
           "bind_address": "127.0.0.1", "secret_file": "secret", "metrics_dir": "metrics",
           "wandb_mode": "disabled", "torch_threads": 1, "step_timeout_s": 20.0,
           **{k: v for k, v in extra.items() if k not in nn_keys}}
nn = {"batch_size": 32, "learning_rate": 0.001, "num_epochs": int(epochs), "eval_steps": 125,
      "track_gradients": False, "dataset": {"name": "MNIST", "root": str(Path(data).resolve())},
      **{k: v for k, v in extra.items() if k in nn_keys}}
Path(d, "cluster_config.yaml").write_text(yaml.safe_dump(cluster))
Path(d, "nn_config.yaml").write_text(yaml.safe_dump(nn))
write_secret(Path(d, "secret"))
PY
  local args=(--cluster-config "$dir/cluster_config.yaml" --nn-config "$dir/nn_config.yaml")
  smolcluster server "${args[@]}" >"$dir/mini1.log" 2>&1 &
  local server=$! pids=()
  for host in mini2 mini3 pi5; do
    smolcluster worker "${args[@]}" --host "$host" >"$dir/$host.log" 2>&1 &
    pids+=($!)
  done
  if [ "$kill_at" != - ]; then  # kill mini3 once it is past kill_at of its own steps
    python - "$dir/metrics/mini3.jsonl" "$kill_at" <<'PY'
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
print(f"killing mini3 at its step {step} of {total}", file=sys.stderr)
PY
    kill -9 "${pids[1]}"
  fi
  wait "$server"
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  if [ "$name" = sync ]; then  # the one-process baseline on the same samples and steps
    smolcluster local "${args[@]}" >"$dir/local.log" 2>&1
  fi
  python - "$dir" "$name" "$kill_at" <<'PY'
import sys
from pathlib import Path
from smolcluster.events import of_kind, read_records
d, name, kill_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def summary(host):
    return of_kind(read_records(d / "metrics" / f"{host}.jsonl"), "summary")[0]
s = summary("mini1")
cells = [name + ("" if kill_at == "-" else f", mini3 killed at {float(kill_at):.0%}"),
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

rows=${ROWS:-sync sync-int8 sync-cosine sync-cosine-kill elastic elastic-kill}
echo "| run | steps | test accuracy |"
echo "|---|---|---|"
for name in $rows; do
  case $name in
    sync) row sync - ;;
    sync-int8) row sync-int8 - use_quantization=true ;;
    sync-cosine) row sync-cosine - lr_schedule=cosine ;;
    sync-cosine-kill) row sync-cosine-kill 0.4 lr_schedule=cosine ;;
    elastic) row elastic - mode=elastic lr_schedule=cosine push_interval=10 ;;
    elastic-kill) row elastic-kill 0.4 mode=elastic lr_schedule=cosine push_interval=10 ;;
    *) echo "unknown row $name" >&2; exit 2 ;;
  esac
done
