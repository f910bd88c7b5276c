# rci_fast: `make demo` and `make test` work from a fresh clone; both are idempotent.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# CPU machines get the pinned CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup test test-fast demo demo-sandbox bench clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[train,test,demo]"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q -m "not slow" tests

# The whole recipe on a tiny model (15-20 minutes on 2 CPU cores): runs/demo/report.md
demo: setup
	$(VPY) -m rci_fast demo --out runs/demo

demo-sandbox: setup
	$(VPY) -m rci_fast sandbox demo
	$(VPY) bench/bench_sandbox.py --quick

bench: setup
	$(VPY) bench/bench_sandbox.py
	$(VPY) bench/bench_logprob.py
	$(VPY) bench/bench_rollout.py
	if $(VPY) -c "import trl" 2>/dev/null; then $(VPY) bench/bench_vs_trl.py; \
	else echo "bench_vs_trl.py skipped: it needs trl (pip install -e .[bench])"; fi

clean:
	rm -rf build *.egg-info $(VENV) sandbox/*.so
