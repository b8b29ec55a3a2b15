# One-command entry points. `make demo` and `make test` install into .venv first when needed.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mdlora-installed
GPU     ?= 0
# Where pip finds torch: PyPI's Linux torch 2.13.0 is the CUDA build (GBs); on a CPU machine that
# has no local CPU wheel, `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

# The version matrix (see README): fbgemm-gpu 1.X is built against exactly torch 2.(X+5).
TORCH_VER   := 2.13.0
FBGEMM_VER  := 1.8.0
TORCHREC_VER:= 1.8.0
RAY_VER     := 2.60.0
# MLflow's lighter client (no server, UI or flavours); sqlalchemy + alembic serve its SQLite store.
MLFLOW_VER  := 3.18.0
ifeq ($(GPU),1)
FBGEMM_PKG  := fbgemm-gpu==$(FBGEMM_VER)
else
FBGEMM_PKG  := fbgemm-gpu-cpu==$(FBGEMM_VER)
endif

.PHONY: setup demo test test-fast lint bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel >/dev/null 2>&1 || $(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==$(TORCH_VER) $(FBGEMM_PKG) "ray[default,train]==$(RAY_VER)" \
	    pyarrow s3fs scikit-learn scipy safetensors "moto[server]" pytest pytest-timeout matplotlib \
	    tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath numpy pyyaml \
	    "mlflow-skinny==$(MLFLOW_VER)" sqlalchemy alembic tensorboardX
	# torchrec declares the CUDA fbgemm-gpu; --no-deps keeps the one chosen above.
	$(BIN)/pip install -q --no-deps torchrec==$(TORCHREC_VER)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, ray; print('mdlora stack ok: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mdlora.jobs.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.suite

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.suite --quick

clean:
	rm -rf $(VENV) build *.egg-info
