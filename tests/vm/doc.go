// Package vm runs the BPF data plane's tests inside qemu on Debian's own
// kernels: Debian 12's 6.1 and the 6.12 it carries in bookworm(-security).
// The build host's kernel proves little about the kernels users boot: the
// verifier, the helpers and the map flags all change between releases, and
// BPF_PROG_TEST_RUN behaves as the running kernel does.
//
// The package holds no Go code; run.sh does the work, so `go test ./...`
// never needs qemu:
//
//	tests/vm/run.sh          # 6.1 and 6.12
//	tests/vm/run.sh 6.12     # one series
//
// For each series it picks the newest linux-image-<series>.*-amd64-unsigned
// that apt knows (the signed package if there is no unsigned one), fetches
// it with `apt-get download` and extracts vmlinuz, the config and the
// module tree into tests/vm/.cache (never committed; about 500 MB for both
// kernels). Without apt or network it uses the newest kernel of the series
// already in the cache.
//
// The tests of ./agent/dataplane and ./cmd/vfctl are built as static
// binaries (CGO_ENABLED=0 go test -c) into an initramfs with a static
// busybox, the modules the tests need that Debian builds as modules (veth,
// with its dependencies from each module's .modinfo, since depmod's
// modules.dep is made at install time and is not in the package) and
// init.sh as /init. /init mounts proc, sysfs, devtmpfs, bpffs, tracefs and
// debugfs, brings lo up, loads the modules, runs each binary as root with
// VELOFLUX_REQUIRE_PRIV=1 (so no privileged test can skip), prints the
// kernel log and a final "VMTEST-RESULT rc=N" line, and powers off.
//
// qemu runs under TCG (no KVM needed; two vCPUs on one host thread, see
// run.sh for why), without a network device, under timeout(1). A run
// passes only if the VMTEST-RESULT line says rc=0, the guest reports the
// expected kernel release, at least one test ran, and the kernel did not
// panic. The serial console of each kernel is kept in
// tests/vm/.out/<release>.log; the terminal shows the tests' PASS, FAIL and
// SKIP lines as they come, then a summary table. The exit status is
// non-zero if any kernel failed or could not be had.
//
// Host requirements, checked and named by run.sh, which installs nothing:
// qemu-system-x86 and busybox-static from apt, the Go toolchain of go.mod,
// and apt itself to fetch kernels. No root is needed on the host.
//
// Environment: VMTEST_SERIES, VMTEST_PACKAGES, VMTEST_RUN (a -test.run
// pattern), VMTEST_TIMEOUT (seconds per VM), VMTEST_CACHE, VMTEST_OUT and
// VMTEST_KEEP=1; see the head of run.sh.
//
// A whole Debian 12 system, rather than a kernel with the tests as init, is
// what image.sh builds (debootstrap, cached in /var/cache/veloflux-vm) and
// what the packages below boot: install (deploy/install.sh and the unit
// under systemd, XDP on virtio-net) and vagrant (deploy/Vagrantfile on a
// box of the same image); vmimage is what they share.
package vm
