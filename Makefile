# coco-shim: every target installs what it needs first (scripts/setup-env.sh, cached).
SHELL := /bin/bash
COCO_CACHE ?= /var/cache/coco-shim
export COCO_CACHE
VENV := $(COCO_CACHE)/venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env test lint typecheck unit integration protos protos-check demo guest-image bench \
	bench-coco bench-guest bench-cri bench-burst bench-idle bench-overhead bench-daemon bench-relay \
	bench-stdout soak fuzz \
	clean

env:
	@bash scripts/setup-env.sh

protos: env
	$(PY) scripts/gen-protos.py

protos-check: env
	$(PY) scripts/gen-protos.py --check

lint: env
	$(VENV)/bin/ruff check .

typecheck: env
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench  # the benchmark scripts (not a package) use the same APIs

# The README's test command: installs, then lint + types + generated-code freshness + all tests.
test: env
	$(PY) scripts/gen-protos.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: env
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: env
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

demo: env
	@$(PY) scripts/demo.py

guest-image: env
	@$(PY) -m guest.image

bench: env
	@$(PY) bench/run.py

# The daemon alone, next to containerd's runc shim: `start`, first RPC, memory of 10 daemons.
# No VM, no containerd: seconds.
bench-daemon: env
	@$(PY) bench/daemon.py

# The stdio relay alone: loopback agent (reference agent on the host, runc), 256 MiB through
# ProcessIO into a FIFO, every byte checked, next to the agent alone. No VM, no containerd.
bench-relay: env
	@$(PY) bench/relay.py

# Where a container's stdout throughput goes (64 MiB, development profile, TCG), stage by stage
# side by side: whole `ctr run`, the guest alone, raw vsock, the agent's ReadStdout without the
# relay. Boots VMs and runs containerd: run it under `heavy`. BASELINE=<initrd> adds another
# guest image's guest and vsock stages to every round (before/after).
bench-stdout: env
	@$(PY) bench/stdout_path.py $(if $(BASELINE),--baseline-initrd $(BASELINE))

# CRI pods with networking: RunPodSandbox+CreateContainer+StartContainer, shim memory.
bench-cri: env
	@$(PY) bench/cri.py

# Many pods at once: per-pod ready times for bursts of 1, 10 and 16 CRI pods with the node's
# boot slots on and off, against 16 in a row (minutes; both cores; ~7 GiB for 16 TCG pods).
BURSTS ?= 1,10,16
SLOTS ?= both
bench-burst: env
	@$(PY) bench/burst.py --bursts $(BURSTS) --slots $(SLOTS) $(if $(BEFORE),--before $(BEFORE))

# Idle pods' CPU on the host, process by process (QEMU by thread, shim, containerd), and the
# guest's interrupts and forks, variants side by side in one window (~3 min).
bench-idle: env
	@$(PY) bench/idle.py

# coco-dev (no TEE; protects nothing): guest pull of a 64 MiB image vs busybox wget of its
# blobs in the same guest, and pod start against the development profile.
bench-coco: env
	@$(PY) bench/coco_dev.py

# Pods of a few sizes: the host footprint beyond guest RAM (QEMU, vhost-device-vsock, shim).
bench-overhead: env
	@$(PY) bench/overhead.py

# Reference guest alone, the pod's QEMU argv: boot to agent Check next to the bare kernel boot
# (medians of 5, interleaved), the boot timeline on the guest's clock, QEMU's memory by kind.
bench-guest: env
	@$(PY) bench/guest.py --runs 5

# Leak soak: CYCLES create/start/exec/delete cycles of a pod through a private containerd
# (ctr, containerd 2.1.9); per-cycle counters; last line `soak: <N> cycles, <L> leaks`.
CYCLES ?= 200
soak: env
	@$(PY) -m tests.soak.soak --cycles $(CYCLES)

# Coverage-guided fuzzing (atheris) of the ttrpc frame decoder, server request path, client
# receive path, start's stdin and the runtime options; last line `fuzz: <N> inputs, <C> crashes`.
FUZZ_INPUTS ?= 1000000
FUZZ_TIME ?= 1200
fuzz: env
	@$(PY) -m tests.fuzz.run --inputs $(FUZZ_INPUTS) --max-time $(FUZZ_TIME)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
