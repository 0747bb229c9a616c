# The two commands a newcomer needs:  make run   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench bench-quick peers clean soak fuzz shim

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench,fuzz]'
	touch $(STAMP)

peers:
	bash scripts/install-peers.sh

run: $(STAMP)
	$(BIN)/edgeward run examples/demo.toml --demo

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports

# The LD_PRELOAD shim that lets unmodified servers (nginx) take handed-off connections
# (shim/handoff_preload.c, docs/handoff-protocol.md). Optional: skipped where no C compiler exists.
SHIM := build/shim/libedgeward_handoff.so
shim: $(SHIM)
$(SHIM): shim/handoff_preload.c
	@mkdir -p $(dir $(SHIM))
	@if command -v $(CC) >/dev/null 2>&1; then \
		$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -ldl; \
	else echo "no C compiler ($(CC)): the handoff shim is not built"; fi

# Every test, against real peers. Under CI (CI=true) a missing peer fails instead of skipping.
test: $(STAMP) peers lint shim
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP) peers
	$(BIN)/python -m bench

bench-quick: $(STAMP) peers
	$(BIN)/python -m bench --quick

# The reliability suite (tests/soak/): full-size soak, slowloris, bad-input storm, reload under load,
# ban durability and fault cases; each prints its figures and PASS/FAIL against its goal.
# Minutes, not seconds: outside `make test` (which runs small versions of the same cases).
soak: $(STAMP) peers
	EDGEWARD_SOAK=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/soak tests/reliability/test_faults.py $(SOAK_ARGS)

# Coverage-guided fuzzing (atheris) of every codec and the guard's filter engine and date
# parser, FUZZ_RUNS inputs each, from and back into the kept corpus in tests/fuzz/corpus/.
FUZZ_RUNS ?= 10000000
FUZZ_MAX_TIME ?= 0
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzzer.py --target all --runs $(FUZZ_RUNS) --max-time $(FUZZ_MAX_TIME) --merge

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
