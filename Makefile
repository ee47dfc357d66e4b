# qwen-tts-fleet: `make setup` then `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
# make demo: Serve's HTTP port on 127.0.0.1 (make demo HTTP_PORT=8010 when 8000 is taken)
HTTP_PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: setup oracle test test-fast lint demo clean constraints

setup: $(BIN)/qtts oracle

$(BIN)/qtts: pyproject.toml cluster/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU build; any other torch spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c cluster/constraints.txt -e ".[test]"
	touch $@

oracle:
	bash tests/oracle/setup.sh

# three pytest lanes: core and other side by side, then the Ray tests alone (tests/run.sh, tests/lanes.py)
test: setup
	PYTHON=$(BIN)/python bash tests/run.sh

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow and not parity"

lint: setup
	$(BIN)/ruff check .

demo: setup
	. cluster/env.sh && $(BIN)/qtts demo --output-dir output --http-port $(HTTP_PORT)

clean:
	rm -rf output .pytest_cache

# The versions `make test` ran with, pinned for CI and the GPU image (cluster/docker/Dockerfile); torch and ray are
# pinned where they are installed. Regenerate after a dependency change, then run `make test`.
constraints: setup
	{ sed -n '1,/^$$/p' cluster/constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  grep -viE '^(torch|ray|triton|nvidia-[a-z0-9-]+)==' ; } > cluster/constraints.txt.new
	mv cluster/constraints.txt.new cluster/constraints.txt
