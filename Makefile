# The README's two commands: `make run` (the main job) and `make test` (the suite).
# Both set themselves up on first use: a .venv with natra_ray installed, and Fashion-MNIST.
# A stamp file records a finished install, so re-running installs nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.natra_installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: run test setup data browser

run: setup
	$(BIN)/python jobs/tune_natra.py $(ARGS)

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we can install packages; otherwise say how.
data:
	@if [ -e "$(FMNIST)" ] || [ -n "$$NATRA_DATA_DIR" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist"; \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "WARNING: apt-get could not install dataset-fashion-mnist"; \
	fi; \
	if [ ! -e "$(FMNIST)" ]; then \
	  echo "NOTE: Fashion-MNIST is not installed. Get it with 'sudo apt-get install -y dataset-fashion-mnist',"; \
	  echo "      or put the four IDX files in a folder and set NATRA_DATA_DIR=<folder>;"; \
	  echo "      natra_ray also downloads them itself when the machine is online."; \
	fi

# The explorer's test drives a real headless browser: Debian's chromium + chromedriver when we
# can install packages (the test skips, saying why, when neither is there).
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	  echo "installing a headless browser for the explorer test: apt-get install -y chromium chromium-driver"; \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "WARNING: apt-get could not install chromium; the explorer's browser test will be skipped"; \
	fi
