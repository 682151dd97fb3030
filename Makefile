# One command each: `make test`, `make demo`, `make bench`. Each builds .venv by itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo demo-text bench race assets lint clean tiny-assets browser plans

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch/torchvision to the builds that work on these CPU machines. uv (fetched from
	# PyPI into .venv, given pip's indexes) installs in ~25 s what pip takes ~2 minutes for; pip if uv fails.
	$(BIN)/python scripts/uv_install.py $(BIN)/python -c constraints.txt -e '.[dev,ocr,clip,video]' || { \
	  $(BIN)/python -m pip install --quiet --upgrade pip && \
	  $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,ocr,clip,video]'; }
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one torch thread each: most tests wait on a subprocess or run tiny
# single-threaded kernels, so two workers on two cores take about half the time of one. --dist loadgroup keeps
# the tests marked xdist_group("two_processes") on one worker: never two multi-process launches at once.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

# Headless Chromium for the report's browser test (Debian's chromium + chromium-driver): apt when the
# machine can fetch, else the packages already in apt's local cache; nothing fatal (the test then says why).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && { \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	    (cd /var/cache/apt/archives && apt-get install -y -qq --no-download --no-install-recommends \
	      ./chromium-common_*.deb ./chromium_*.deb ./chromium-driver_*.deb >/dev/null 2>&1); } ; \
	  command -v chromedriver >/dev/null || echo "note: chromium / chromedriver could not be installed; the browser test will be skipped"; }

# Tiny offline models for the quickstart and the tiny configs: built from code (seeded), saved with
# save_pretrained, opened like a hub id.
assets/tiny/%: | $(STAMP)
	$(BIN)/python -m diffrl.models.tiny $* $@

tiny-assets: assets/tiny/dllm assets/tiny/diffusion_gemma assets/tiny/sdar assets/tiny/llada2 assets/tiny/sd3 assets/tiny/sd15 assets/tiny/preferences

# The quickstart: AWM on the shipped assets/sd3-text model against a real OCR reward, offline, CPU, ~6 minutes.
demo: $(STAMP)
	$(BIN)/diffrl train configs/quickstart.yaml

demo-text: $(STAMP)
	$(BIN)/diffrl train configs/quickstart_text.yaml

# Re-make the shipped small base models (seeded; sd3-shapes ~10 minutes, dllm-addition ~13,
# diffusiongemma-addition ~45 on 2 cores).
assets: $(STAMP)
	$(BIN)/python scripts/make_tiny_assets.py all

bench: $(STAMP)
	$(BIN)/python scripts/bench/advantages.py
	$(BIN)/python scripts/bench/rewards.py
	$(BIN)/python scripts/bench/trainer_overhead.py
	$(BIN)/python scripts/bench/dllm_generate.py

race: $(STAMP)
	$(BIN)/python scripts/bench/awm_vs_flow_grpo.py

lint: $(STAMP)
	$(BIN)/ruff check diffrl rewards tests scripts

clean:
	rm -rf $(VENV) build *.egg-info

# Every published config planned at full size on its header's hardware (fake tensors, nothing downloaded):
# docs/plans.json and the README's "Will it fit?" table. Minutes per config on 2 cores.
plans: $(STAMP)
	$(BIN)/python scripts/plans.py
