# Two commands on a fresh machine:
#   make run    set up, then train the embedded default (tiny Baichuan, bundled sample, CPU)
#   make test   set up, then run the whole test suite (slow multi-process and SSH tests included)
.PHONY: run test setup bench

run:
	bash scripts/setup.sh
	.venv/bin/mlaunch run configs/tiny.yaml --standalone

test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q

bench:
	bash scripts/setup.sh --test
	.venv/bin/python benchmarks/run_all.py
