#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a venv in .venv with smolcluster, the controller
# tools (ansible, paramiko, matplotlib) and, with --dev, the test tools and the lab's packages
# (the lab's rootfs itself is built on its first `tests/lab/lab.sh up`, cached outside the clone).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=false
[[ "${1:-}" == "--dev" ]] && dev=true
python=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
extras=controller
$dev && extras=controller,dev
# torch/torchvision come from the default index (pip's config decides which build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"

if $dev && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  # The lab (booted containers in namespaces; iptables for the doctor's firewall case, a rule
  # inside a lab namespace) and the local default's tmux jobs need these (tests skip the lab
  # without root).
  need=()
  for cmd in ssh:openssh-client ip:iproute2 ping:iputils-ping tmux:tmux socat:socat \
    systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux \
    iptables:iptables; do
    command -v "${cmd%%:*}" >/dev/null || [[ -x /usr/sbin/${cmd%%:*} ]] || need+=("${cmd#*:}")
  done
  if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, smolcluster; print("torch", torch.__version__, "smolcluster", smolcluster.__version__)')"
