# The two commands of the README:
#   make demo   set up, then run the main job on the embedded default (six hosts, one machine)
#   make test   set up (with test tools), then lint and run every test
.PHONY: setup setup-dev demo test lint

setup:
	./scripts/setup.sh

setup-dev:
	./scripts/setup.sh --dev

demo: setup
	./scripts/demo.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: setup-dev lint
	.venv/bin/pytest -q -ra --durations=25
