# One command each: `make test`, `make demo`, `make bench`. Each builds .venv by itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision to the builds that work on these CPU machines.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,ocr,clip]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The quickstart's model: built from code (seeded), saved with save_pretrained, opened like a hub id.
assets/tiny/dllm: | $(STAMP)
	$(BIN)/python -m diffrl.models.tiny dllm $@

demo: $(STAMP) assets/tiny/dllm
	$(BIN)/diffrl train configs/quickstart.yaml

bench: $(STAMP)
	$(BIN)/python scripts/bench/advantages.py
	$(BIN)/python scripts/bench/rewards.py

lint: $(STAMP)
	$(BIN)/ruff check diffrl rewards tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
