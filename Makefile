# qmpwatch: two commands do all set-up on a fresh Debian machine.
#   make run    set up, then show the daemon at work on a throwaway real QEMU (qmpwatch demo)
#   make test   set up, then lint (with the layers' import contracts), type-check and run the
#               whole suite (real QEMU, Alertmanager, libvirt, a real systemd); every real-QEMU
#               test runs on the system's QEMU and on QEMU 10.0 (.cache/)
#   make install / make uninstall   (as root) qmpwatch as a systemd service on this host:
#               scripts/install says what each does; QMPWATCH_GROUP= the QEMU sockets' group
#               (default kvm), QMPWATCH_WHEELS= a directory of wheels to install from offline
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
QEMU10 := .cache/qemu-10.0

.PHONY: run test lint typecheck pytest bench soak clean install uninstall system-deps-test \
        system-deps-run system-deps-bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

system-deps-test:
	scripts/ensure-system-deps test

system-deps-run:
	scripts/ensure-system-deps run

system-deps-bench:
	scripts/ensure-system-deps bench

# QEMU 10.0 from bookworm-backports beside the system's, extracted in the checkout (no install)
$(QEMU10)/complete:
	scripts/fetch-qemu $(QEMU10)

run: system-deps-run $(BIN)/.installed
	$(BIN)/qmpwatch demo

test: system-deps-test $(BIN)/.installed lint typecheck pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(BIN)/.installed
	$(BIN)/mypy

pytest: $(BIN)/.installed $(QEMU10)/complete
	$(BIN)/python -m pytest -q

bench: system-deps-bench $(BIN)/.installed
	$(BIN)/python -m bench
	$(BIN)/python -m bench.alert_latency
	$(BIN)/python -m bench.logbatch
	$(BIN)/python -m bench.libvirt
	$(BIN)/python -m bench.isolation

# 20 real VMs, every scenario, 10 minutes: event counts, crashes, RSS and fds (not in CI)
soak: system-deps-run $(BIN)/.installed
	$(BIN)/python -m bench.soak --vms 20 --minutes 10

install:
	scripts/install install

uninstall:
	scripts/install uninstall

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
