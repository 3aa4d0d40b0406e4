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

.PHONY: install test demo bench aot aot-matrix

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
# collected") is turned into a failure.
test: install
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(WORKERS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: install
	$(PY) -m ke_fast run

bench: install
	$(PY) -m pytest benchmarks --benchmark-only

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
