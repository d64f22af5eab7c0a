#!/usr/bin/env bash
# The main job on the embedded default: the real playbooks against inventory/local.yml, where
# the six host names are processes on this machine, training on full MNIST (fetched once by
# site.yml's dataset role). One epoch by default (375 steps of 5 x 32 samples, a few minutes
# on 2 cores); EPOCHS=2 make demo for a longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ansible-playbook site.yml
ansible-playbook train.yml -e "epochs=${EPOCHS:-1}"
ansible-playbook teardown.yml
