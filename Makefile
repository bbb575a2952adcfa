# Entry points: `make demo` (the main job on the embedded demo data), `make test` (the whole suite, what CI
# runs), `make test-fast` (unit tests only: no processes started, for the edit loop) and `make lint` (ruff + pyright).
# Each creates or updates .venv first; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO   := runs/demo
# The venv's tools come first for every recipe and the processes tests start: one ninja (DeepSpeed builds its
# CPU op with whichever is on PATH, and two ninja versions rebuild it in turn), the venv's mmclip and deepspeed.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast install demo-data lint clean

install: $(STAMP)

# torch and torchvision come first, pinned, so pip takes the wheels on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

demo-data: $(STAMP)
	$(BIN)/python -m pipeline.data.demo

# A fresh run each time: train, then the zero-shot table and the open_clip export.
demo: demo-data
	rm -rf $(DEMO)
	$(BIN)/mmclip train configs/demo.yaml --set output_dir=$(DEMO)
	$(BIN)/mmclip eval --checkpoint $(DEMO) --task zeroshot_classification \
		--dataset data/shards/demo/wds/fashion_mnist --output $(DEMO)/eval_fashion_mnist.json
	$(BIN)/mmclip eval --checkpoint $(DEMO) --task zeroshot_retrieval \
		--dataset data/shards/demo/wds/fashion_mnist_retrieval --output $(DEMO)/eval_retrieval.json
	$(BIN)/mmclip export $(DEMO) --format open_clip --out $(DEMO)/export

test: $(STAMP)
	bash tests/install_system_deps.sh
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	@start=$$(date +%s); $(BIN)/python -m pytest -q tests/unit; code=$$?; \
	echo "make test-fast: tests/unit in $$(( $$(date +%s) - start )) s"; exit $$code

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/pyright

clean:
	rm -rf runs data/shards data/fashion_mnist/images
