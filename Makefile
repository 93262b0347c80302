# qmpwatch: two commands do all set-up on a fresh Debian machine.
#   make run    set up, then show the daemon at work on a throwaway real QEMU (qmpwatch demo)
#   make test   set up, then lint (with the layers' import contracts), type-check and run the
#               whole suite (real QEMU, Alertmanager, libvirt, a real systemd); every real-QEMU
#               test runs on the system's QEMU and on QEMU 10.0 (.cache/)
#   make deb    the Debian packages qmpwatch_<version>_<arch>.deb and qmpwatch-libvirt_... in dist/
#               (scripts/build-deb: its own Python environment in /opt/qmpwatch, built offline
#               from wheels of the registries the venv comes from; README: Run it on your hosts)
#   make fresh-run  (as root, CI) `make run` from a clean clone on a fresh Debian 12 root
#   make install / make uninstall   (as root) qmpwatch as a systemd service on this host:
#               scripts/install says what each does; QMPWATCH_GROUP= the QEMU sockets' group
#               (default kvm), QMPWATCH_WHEELS= a directory of wheels to install from offline
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
QEMU10 := .cache/qemu-10.0

.PHONY: run test lint typecheck pytest bench soak clean install uninstall system-deps-test \
        system-deps-run system-deps-bench system-deps-deb deb fresh-run

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

system-deps-deb:
	scripts/ensure-system-deps deb

# QEMU 10.0 from bookworm-backports beside the system's, extracted in the checkout (no install)
$(QEMU10)/complete:
	scripts/fetch-qemu $(QEMU10)

# A real Linux guest for the lab: a Debian kernel and a busybox initramfs from Debian packages
# (apt-get download into .cache/guest; nothing installed), for the real-guest tests
GUEST := .cache/guest
$(GUEST)/kit/complete: | $(BIN)/.installed-test
	$(BIN)/python -m qmpwatch.lab.fetch_guest $(GUEST)
pytest: $(GUEST)/kit/complete

run: system-deps-run $(BIN)/.installed-run
	$(BIN)/qmpwatch demo

# the package tests (tests/deb) build the packages once per session, kept by the sources' hash
test: system-deps-test system-deps-deb $(BIN)/.installed-test lint typecheck pytest

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
	$(BIN)/python -m bench.isolation

# 20 real VMs, every scenario, 10 minutes: event counts, crashes, RSS and fds (not in CI)
soak: system-deps-run $(BIN)/.installed-run
	$(BIN)/python -m bench.soak --vms 20 --minutes 10

deb: system-deps-deb
	scripts/build-deb --out dist

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
