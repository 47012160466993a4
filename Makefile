# One command each for a fresh clone: `make serve` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make serve PORT=8080` overrides the port; unset, the service's ADAMTL_HOST and ADAMTL_PORT
# settings apply (default 127.0.0.1:8000).
SERVE_ARGS := $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

.PHONY: setup serve test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m service $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.model_latency --preset demo
	$(BIN)/python -m benchmarks.model_latency --preset swin-t
	$(BIN)/python -m benchmarks.block_scaling --preset demo
	$(BIN)/python -m benchmarks.service_load

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
