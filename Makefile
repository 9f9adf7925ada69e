# Two commands on a fresh machine:
#   make run    set up, then train the embedded default (tiny Baichuan, bundled sample, CPU)
#   make test   set up, then run every test tier but gpu: tests/unit, tests/dist, tests/ssh
.PHONY: run test setup bench

run:
	bash scripts/setup.sh
	.venv/bin/mlaunch run configs/tiny.yaml --standalone

test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q -n 2

# The CPU benchmarks of benchmarks/README.md (fan-out needs Debian's pdsh; gpu_check needs a GPU).
bench:
	bash scripts/setup.sh --test
	command -v pdsh >/dev/null || apt-get install -y -qq pdsh >/dev/null
	.venv/bin/python benchmarks/cli_startup.py
	.venv/bin/python benchmarks/data_stats.py
	OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_throughput.py --repeats 3
	.venv/bin/python benchmarks/fanout.py
