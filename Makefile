# qmpwatch: two commands do all set-up on a fresh Debian machine.
#   make run    set up, then show the daemon at work on a throwaway real QEMU (qmpwatch demo)
#   make test   set up, then lint (with the layers' import contracts), type-check and run the
#               whole suite (real QEMU, Alertmanager, libvirt, a real systemd); every real-QEMU
#               test runs on the system's QEMU and on QEMU 10.0 (.cache/)
#   make fresh-run  (as root, CI) `make run` from a clean clone on a fresh Debian 12 root
#   make install / make uninstall   (as root) qmpwatch as a systemd service on this host:
#               scripts/install says what each does; QMPWATCH_GROUP= the QEMU sockets' group
#               (default kvm), QMPWATCH_WHEELS= a directory of wheels to install from offline
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
QEMU10 := .cache/qemu-10.0

.PHONY: run test lint typecheck pytest bench soak clean install uninstall system-deps-test \
        system-deps-run system-deps-bench fresh-run

# Two install markers: `make run` needs only the package (wheels: no compiler, no libvirt, no
# linters); `make test` and `make bench` add the `test` extra (libvirt-python builds against
# libvirt-dev with python3-dev and gcc, which `ensure-system-deps test` installs).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(BIN)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

system-deps-test:
	PYTHON=$(PYTHON) scripts/ensure-system-deps test

system-deps-run:
	PYTHON=$(PYTHON) scripts/ensure-system-deps run

system-deps-bench:
	PYTHON=$(PYTHON) scripts/ensure-system-deps bench

# QEMU 10.0 from bookworm-backports beside the system's, extracted in the checkout (no install)
$(QEMU10)/complete:
	scripts/fetch-qemu $(QEMU10)

run: system-deps-run $(BIN)/.installed-run
	$(BIN)/qmpwatch demo

test: system-deps-test $(BIN)/.installed-test lint typecheck pytest

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(BIN)/.installed-test
	$(BIN)/mypy

pytest: $(BIN)/.installed-test $(QEMU10)/complete
	$(BIN)/python -m pytest -q

bench: system-deps-bench $(BIN)/.installed-test
	$(BIN)/python -m bench
	$(BIN)/python -m bench.alert_latency
	$(BIN)/python -m bench.logbatch
	$(BIN)/python -m bench.libvirt

# 20 real VMs, every scenario, 10 minutes: event counts, crashes, RSS and fds (not in CI)
soak: system-deps-run $(BIN)/.installed-run
	$(BIN)/python -m bench.soak --vms 20 --minutes 10

# CI (.ci/run): `make run` from a clean clone on a fresh Debian 12 root (as root; the root is
# made once, ~25 s, and kept in /var/cache/qmpwatch/fresh; then about a minute a run)
fresh-run:
	scripts/ensure-system-deps fresh
	scripts/fresh-root run

install:
	scripts/install install

uninstall:
	scripts/install uninstall

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
