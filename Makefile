# The two quick-start commands: `make demo` and `make test` (each sets up first).
.PHONY: setup test lint bench demo

setup:
	./scripts/install-deps.sh

lint: setup
	.venv/bin/ruff check mirenfs tests bench
	.venv/bin/mypy

test: setup lint
	.venv/bin/pytest -q

bench: setup
	.venv/bin/python -m bench

demo: setup
	.venv/bin/mirenfs demo
