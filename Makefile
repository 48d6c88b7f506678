# The two commands a fresh machine needs: `make demo` (the main job) and `make test` (everything CI runs).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

# DiLoCo and its DDP baseline on the default config (tiny GPT, 4 simulated workers, Shakespeare, CPU) with the
# DiLoCo settings conf/experiment/demo.yaml chose by a measured sweep, then a comparison table and what it means. Extra Hydra overrides: make demo ARGS="workers=8 compression=int8"
demo: setup
	$(BIN)/locoswarm-train -m algorithm=ddp,diloco experiment=demo hydra.sweep.dir=runs/demo $(ARGS)

# Lint + the whole suite (slow and network tests included; gpu tests only where CUDA exists).
test: setup
	@bash scripts/test.sh

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not network and not gpu"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_inner_loop.py
