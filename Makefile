# The two quick-start commands: `make demo` and `make test` (each sets up first).
.PHONY: setup test fast lint bench demo

setup:
	./scripts/install-deps.sh

lint: setup
	.venv/bin/ruff check mirenfs tests bench
	.venv/bin/mypy

test: setup lint
	.venv/bin/pytest -q

# The tiers without root or mounts, on both cores (a module's tests stay on one worker, so a
# module's fixtures are built once). Three workers: a third of their time is waiting (etcd
# members failing, time-outs), which a third worker fills (68 s with two, 50 s with three).
fast: setup
	.venv/bin/pytest -q -n 3 --dist loadfile tests/t1_*.py tests/t2_*.py tests/t3_*.py

bench: setup
	.venv/bin/python -m bench

demo: setup
	.venv/bin/mirenfs demo
