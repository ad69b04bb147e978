# make demo   run the quickstart job on a local Ray instance (mnist5k, CPU, a few minutes)
# make test   lint, then the whole test suite (real local Ray, about 20 minutes on 2 cores): what CI runs
# make test-fast  lint and every test that does not start Ray (about 2 minutes)
# make bench  run the benchmarks and rewrite bench/RESULTS.md
# Each target creates .venv and installs raykd into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raykd-installed

# Ray 2.60 enables token auth by default; local runs and job submission need none of it.
export RAY_AUTH_MODE := disabled

.PHONY: install browser demo lint test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/raykd run jobs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check raykd tests bench

# The report test renders raykd's HTML page in a real headless browser: Debian's chromium.
# As root (CI, containers) it is installed here; otherwise one line says the command to run.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's chromium for the report test (apt-get)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "make: the report test needs a headless browser: run 'sudo apt-get install chromium', then make test again" >&2; \
	    exit 1; \
	  fi; }

test: lint browser
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not ray"

# Each script measures both sides of its comparison in one invocation (alternating, 3 repetitions
# where a side takes minutes or less) and rewrites its section of bench/RESULTS.md. About 110 min.
QUICKSTART_BASELINE ?= b2f5373   # the commit the packed-run work started from
bench: $(STAMP)
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/eval_batch.py
	$(BIN)/python bench/kd_overhead.py
	$(BIN)/python bench/teacher_service.py
	$(BIN)/python bench/heads_layout.py
	$(BIN)/python bench/whole_job.py
	$(BIN)/python bench/quickstart.py --against $(QUICKSTART_BASELINE)
	$(BIN)/python bench/neighbourhood.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/test_suite.py --against $(QUICKSTART_BASELINE)

clean:
	rm -rf runs bench/runs
