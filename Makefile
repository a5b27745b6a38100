# make demo : create .venv and fine-tune SmolLM2-135M on real tweets with ZO (CPU or GPU)
# make test : create .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zokernels-installed

.PHONY: demo test env clean

env: $(STAMP)

# A venv that sees system packages, so a machine that already has a CUDA torch keeps it; otherwise
# torch 2.13.0 (CPU build, from local disk on our machines) is installed first and pinned.
$(STAMP): pyproject.toml setup.py requirements/cpu.txt requirements/runtime.txt requirements/data.txt $(wildcard csrc/*)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) requirements/pin_installed.py > $(VENV)/constraints.txt
	if grep -q '^torch==2.13.0' $(VENV)/constraints.txt; then \
	  $(PY) -m pip install -q -r requirements/cpu.txt -c $(VENV)/constraints.txt; \
	else \
	  $(PY) -m pip install -q -r requirements/runtime.txt -c $(VENV)/constraints.txt; \
	fi
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m zokernels finetune $(ARGS)

test: $(STAMP)
	$(PY) -m zokernels
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info zokernels/_cuda*.so

# make gpu-wheels    : download the wheels the GPU machine's image may lack into benchmarks/wheels/ (~3.2 MiB,
#                      ignored by git); the device call carries them: benchmarks/README.md
# make gpu-rehearsal : benchmarks/gpu_session.sh on CPU in a Python shaped like the GPU image (venv cached in
#                      ~/.cache/zokernels; tests/test_gpu_rehearsal.py runs it in CI)
.PHONY: gpu-wheels gpu-rehearsal

gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py fetch

gpu-rehearsal:
	bash benchmarks/gpu_rehearsal.sh
