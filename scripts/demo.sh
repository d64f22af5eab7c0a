#!/usr/bin/env bash
# The main job on the embedded default: the real playbooks against inventory/local.yml, where
# the six host names are processes on this machine. EPOCHS=1 make demo for a shorter run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ansible-playbook site.yml
ansible-playbook train.yml -e "epochs=${EPOCHS:-2}"
ansible-playbook teardown.yml
