# The two set-up commands of the README. torch is pinned: the CPU wheel on disk installs in seconds,
# an unpinned torch pulls a multi-GB CUDA build. A machine whose torch already sees a GPU keeps its own
# torch and triton: there `make test` installs ke_fast alone (no dependencies, no build isolation, no
# network), so pip never pulls a second, CUDA-less torch.
# ke_fast's C++ CPU kernels compile during the install, against the torch installed first: hence no build
# isolation (an isolated build environment has no torch, or pulls one of its own), which needs setuptools,
# wheel and ninja in the environment, and --use-pep517 (else pip's legacy `setup.py develop` path re-runs
# pip with isolation). Where the compile fails the install goes on and the kernels build at first use.
PY ?= python3
TORCH ?= torch==2.13.0
WORKERS ?= auto
HAS_CUDA := $(shell $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)

.PHONY: install test test-shuffled demo bench bench-cli gpu-report aot aot-matrix

install:
ifeq ($(HAS_CUDA),1)
	@echo "CUDA torch found: keeping it; installing ke_fast only (its C++ CPU kernels compile now, ~1 min)"
	$(PY) -m pip install -q --no-deps --no-build-isolation --use-pep517 -e .
else
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja
	@echo "installing ke_fast (its C++ CPU kernels compile now, ~1 min)"
	$(PY) -m pip install -q --no-build-isolation --use-pep517 -e ".[test,bench,demo]"
endif

# pytest-xdist spreads the suite over the cores (WORKERS=0 runs it in one process); exit 5 ("no tests
# collected") is turned into a failure. `make test` keeps the file order (-p no:randomly: pytest-randomly,
# in the test extra, would shuffle otherwise); `make test-shuffled` runs the tests in a random order, printing
# the seed ("Using --randomly-seed=N"): rerun a failing order with SEED=N. Without the cache provider no
# state carries from one run to the next; the tests must not depend on their order or on each other.
test: install
	$(PY) -m pytest tests -q -p no:cacheprovider -p no:randomly -n $(WORKERS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-shuffled: install
	@seed=$${SEED:-$$($(PY) -c "import random; print(random.randrange(1 << 31))")}; \
	  echo "test-shuffled: --randomly-seed=$$seed"; \
	  $(PY) -m pytest tests -q -p randomly -p no:cacheprovider --randomly-seed=$$seed -n $(WORKERS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	  echo "test-shuffled: seed $$seed (rerun this order: make test-shuffled SEED=$$seed)"; exit $$rc

demo: install
	$(PY) -m ke_fast run

# Results ledger (benchmarks/ledger.py): each target writes its JSON under benchmarks/results/, named
# <machine>-<date>-<commit>[-dirty], with the commit, a clean-tree flag, the machine and the command inside.
# bench: the kernel benchmarks (pytest-benchmark). bench-cli: whole CLI runs as paired, repeated processes
# (CLI_ARGS, e.g. CLI_ARGS="--case cpu-run --repeats 7"). gpu-report: on a GPU host the CUDA tests, the
# paper-scale whole run and the kernel benchmarks in under 10 minutes; elsewhere it prints its plan.
# Render any of them with: python benchmarks/report.py FILE; README blocks: python benchmarks/report.py --update-readme
bench: install
	KE_FAST_LEDGER_COMMAND="make bench" $(PY) -m pytest benchmarks --benchmark-only \
	  --benchmark-json=$$($(PY) benchmarks/ledger.py path)

bench-cli: install
	KE_FAST_LEDGER_COMMAND='make bench-cli$(if $(CLI_ARGS), CLI_ARGS="$(CLI_ARGS)")' $(PY) benchmarks/cli_bench.py $(CLI_ARGS)

gpu-report: install
	KE_FAST_LEDGER_COMMAND="make gpu-report" $(PY) benchmarks/gpu_report.py

aot: install
	$(PY) -m ke_fast.kernels.aot

# The same check under several Triton releases, each in its own venv under build/ (git-ignored):
#   make aot-matrix TRITONS="3.6.0 3.9.0"
TRITONS ?= 3.6.0 3.9.0
AOT_VENVS ?= build/aot-venvs
aot-matrix:
	@rc=0; for v in $(TRITONS); do \
	  venv=$(AOT_VENVS)/triton-$$v; \
	  if [ ! -x $$venv/bin/python ]; then \
	    $(PY) -m venv $$venv && $$venv/bin/python -m pip install -q "$(TORCH)" "triton==$$v" numpy \
	      && $$venv/bin/python -m pip install -q --no-deps -e . || { rm -rf $$venv; exit 1; }; \
	  fi; \
	  echo "== triton $$v"; \
	  env -u TRITON_INTERPRET $$venv/bin/python -m ke_fast.kernels.aot || rc=1; \
	done; exit $$rc
