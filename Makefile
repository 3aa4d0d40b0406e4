# The two set-up commands of the README. torch is pinned: the CPU wheel on disk installs in seconds,
# an unpinned torch pulls a multi-GB CUDA build. A machine whose torch already sees a GPU keeps its own
# torch and triton: there `make test` installs ke_fast alone (no dependencies, no build isolation, no
# network), so pip never pulls a second, CUDA-less torch.
PY ?= python3
TORCH ?= torch==2.13.0
WORKERS ?= auto
HAS_CUDA := $(shell $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)

.PHONY: install test demo bench aot

install:
ifeq ($(HAS_CUDA),1)
	@echo "CUDA torch found: keeping it; installing ke_fast only"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,demo]"
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
