# morphlab: one-command set-up, main job and tests. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FASHION_DEBIAN := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data data-folders run readme test test-slow test-reliability bench tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --no-compile --disable-pip-version-check -q -r requirements.txt
	$(VENV)/bin/pip install --no-compile --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	@# byte-compile once (about 40 s): with PYTHONDONTWRITEBYTECODE set, as on these machines, every process would
	@# otherwise recompile lightning, torchmetrics and torchvision from source (import train: 28 s -> 11 s); a few
	@# packages ship files for other Python versions that do not compile, hence the || true
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $@

# Real FashionMNIST offline: Debian's dataset-fashion-mnist (needs root). Elsewhere torchvision downloads it.
data:
	@if [ ! -f $(FASHION_DEBIAN) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# Real data in the formats of "your own data": FashionMNIST as PNG folders (data/fashion_mnist_png), wine as CSV and
# Parquet with a categorical column and missing cells (data/tables), both as local Hugging Face datasets (data/hf).
data-folders: install data
	$(PY) tools/write_image_folder.py --out data/fashion_mnist_png
	$(PY) tools/write_table.py --out data/tables
	$(PY) tools/write_hf_datasets.py --out data/hf

# The main job: every technique on real FashionMNIST, short budgets (configs/suites/quick.yaml, < 15 min on 2 cores).
# Finished runs are skipped, so an interrupted `make run` continues where it stopped.
run: install data
	$(PY) compare.py run quick

# Rewrite README's quick-suite block (table + plot) from results/quick/ (run `make run` first).
readme: install
	$(PY) compare.py report quick --readme README.md

test: install data
	$(PY) -m pytest

test-slow: install data
	$(PY) -m pytest -m slow

test-reliability: install data
	$(PY) -m pytest -m slow tests/test_crash_resume.py tests/test_ddp.py tests/test_compare.py tests/test_bad_inputs.py tests/test_reliability.py tests/test_tune.py

bench: install data
	$(PY) benchmarks/overhead.py --config configs/fashion_mnist/baseline.yaml

tensorboard: install
	$(VENV)/bin/tensorboard --logdir_spec runs:runs,results:results

clean:
	rm -rf runs .pytest_cache
