# VeloFlux. `sudo make test` on a fresh Debian 12 host installs what it is
# missing and runs every test; see README.md.

GO        ?= go
BPFTOOL   ?= bpftool
# A count, not a duration: with a duration, Go 1.26's fuzzing coordinator
# can report its own deadline as a failure (golang/go#75804, fixed in 1.27).
# About 30 s on a 2-CPU machine.
FUZZTIME  ?= 100000x
BENCHTIME ?= 200000x
# Static analysis beyond go vet, pinned so that CI and laptops agree; fetched
# through the Go module proxy on first use.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
export GOTOOLCHAIN := local

GENERATED := $(wildcard agent/dataplane/*_bpfel.o agent/dataplane/*_bpfel.go)

.PHONY: all build generate check-generated check-format vmlinux test vmtest vm-image fuzz bench demo demo-cluster image deps-build deps-test deps-vmtest deps-demo deps-democluster deps-bench clean

all: build

build:
	$(GO) build -o bin/ ./cmd/... ./tests/demo ./tests/democluster

deps-build:
	deploy/install-deps.sh build

deps-vmtest:
	deploy/install-deps.sh vmtest

# The Vagrant test needs vagrant-libvirt; where it does not install, that
# test skips (or fails with VELOFLUX_REQUIRE_PRIV=1) and the rest runs.
deps-test:
	deploy/install-deps.sh test
	deploy/install-deps.sh vagrant || \
		echo "make: vagrant-libvirt did not install; tests/vm/vagrant will not run" >&2

deps-demo:
	deploy/install-deps.sh demo
deps-democluster:
	deploy/install-deps.sh democluster

deps-bench:
	deploy/install-deps.sh bench

# Compile the BPF C and regenerate the Go bindings (committed, so that
# `go build` needs no clang).
generate: deps-build
	cd agent/dataplane && $(GO) generate ./...

# CI: the committed objects must be exactly what `make generate` produces.
check-generated: generate
	@git diff --exit-code --stat -- agent/dataplane || \
		{ echo "generated BPF objects differ from the committed ones: run 'make generate' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- agent/dataplane)" || \
		{ git status --porcelain -- agent/dataplane; echo "untracked generated files" >&2; exit 1; }

# Refresh vmlinux.h from the running kernel's BTF.
vmlinux: deps-build
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/vmlinux.h

# The Go tree is gofmt'ed (vmlinux/ holds only the generated vmlinux.h) and
# the BPF C follows bpf/.clang-format.
CLANG_FORMAT ?= clang-format-19
GOFMT ?= gofmt
check-format:
	@out=$$($(GOFMT) -l $$(git ls-files '*.go' | grep -v '^vmlinux/')); \
		test -z "$$out" || { echo "gofmt needed on:" $$out >&2; exit 1; }
	$(CLANG_FORMAT) --dry-run --Werror bpf/*.c bpf/include/*.h

# Formatting, unit tests, BPF tests through BPF_PROG_TEST_RUN, namespace tests, then a
# bounded fuzz run seeded from the table cases. Privileged parts skip
# without root unless VELOFLUX_REQUIRE_PRIV=1.
test: deps-test check-format
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	@$(MAKE) --no-print-directory vm-image
	$(GO) test -count=1 -timeout 20m ./...
	tests/vm/run.sh
	$(GO) test -count=1 -run '^$$' -fuzz '^FuzzBalancer$$' -fuzztime $(FUZZTIME) ./agent/dataplane

# The BPF tests (agent/dataplane, vfctl's pinned-map test) on Debian 12's
# own 6.1 kernel and its 6.12, each booted in qemu (TCG, no KVM) with the
# tests as its init; about half a minute once the kernels are cached in
# tests/vm/.cache. `make test` runs it too. See tests/vm/doc.go.
vmtest: deps-vmtest
	tests/vm/run.sh

# The Debian 12 image tests/vm/install and tests/vm/vagrant boot. The tests
# would build it themselves; built here first, it is announced while it is
# being built (once: about 4 minutes, then cached in /var/cache/veloflux-vm).
vm-image:
	@if [ "$$(id -u)" -ne 0 ]; then \
		echo "make: not root: no VM image, and the VM tests skip"; \
	else \
		tests/vm/image.sh >/dev/null; \
	fi

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzBalancer$$' -fuzztime 2000000x ./agent/dataplane

# Every benchmark of docs/BENCHMARKS.md, each with its peers in the same run:
# the XDP program's per-packet cost against an XDP_PASS floor, Maglev and
# reconcile, the L4 lab against nftables and HAProxy, the L7 proxy against
# HAProxy, nginx and bare net/http references, the API with 1,000 WebSocket
# clients and a 1,000-VIP scrape. It takes some fourteen minutes.
bench: deps-test deps-bench build
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkXDP' -benchtime $(BENCHTIME) ./agent/dataplane
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 20x ./agent/maglev ./agent/reconcile ./agent/metrics
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkL4$$|BenchmarkL7$$' -benchtime 1x -timeout 30m ./tests/bench
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 10m ./tests/live

# The namespace lab with the agent attached and light client traffic; runs
# until Ctrl-C, or for DEMO_SECONDS. Everything it creates is removed.
# It runs the built binary rather than `go run`, so that Ctrl-C reaches the
# demo directly and its exit status is make's.
demo: deps-demo build
	bin/demo --agent bin/veloflux --vfctl bin/vfctl --config deploy/demo.yaml

# The lab of tests/cluster: a router running BIRD with ECMP over three
# nodes that announce the VIP over BGP, three backends and client streams;
# it prints how to kill, silence or drain a node. Until Ctrl-C, or for
# DEMO_SECONDS; everything it creates is removed.
demo-cluster: deps-democluster build
	bin/democluster --agent bin/veloflux --vfctl bin/vfctl

# The agent's container image from static binaries built here (no image is
# pulled); see deploy/Dockerfile and the README. DOCKER=podman works too.
DOCKER ?= docker
image:
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/container/ ./cmd/veloflux ./cmd/vfctl
	$(DOCKER) build -f deploy/Dockerfile --build-arg BINARIES=host -t veloflux .

clean:
	rm -rf bin tests/artifacts
