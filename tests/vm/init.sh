#!/bin/sh
# PID 1 of the test VM (busybox sh). run.sh writes /vmtest.conf next to it:
#   MODULES     .ko files under /lib/modules, dependencies first
#   TESTS       name:package-dir pairs; /tests/NAME.test runs in /src/DIR
#   GO_TIMEOUT  -test.timeout of each test binary
#   TEST_RUN    -test.run pattern, if any (VMTEST_RUN on the host)
# The host decides pass or fail from the VMTEST-* lines alone, so every path
# through this script ends with VMTEST-RESULT and a power-off: if PID 1
# exited instead, the kernel would panic and the run would read as a crash.

export PATH=/bin TMPDIR=/tmp HOME=/root

fail() {
	echo "VMTEST-ERROR $*"
	rc=1
}

rc=0
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount tmpfs on /tmp"
# cilium/ebpf pins under a BPF filesystem; the tests mount their own
# instances too, but the agent's default path lives here.
mount -t bpf -o mode=0700 bpf /sys/fs/bpf || fail "mount bpffs"
# Not needed by the tests today; mounted so that a failing verifier or a
# bpf_printk can be looked at from a debug shell without remounting.
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up || fail "bring lo up"

# shellcheck source=/dev/null # written by run.sh
. /vmtest.conf
set -- -test.v -test.count=1 -test.timeout="$GO_TIMEOUT"
[ -n "$TEST_RUN" ] && set -- "$@" -test.run="$TEST_RUN"

# The newline ends whatever the firmware or the kernel left on the console's
# last line, so that the markers start their own lines.
echo
echo "VMTEST-KERNEL $(uname -r)"

for m in $MODULES; do
	insmod "/lib/modules/$m" || fail "insmod $m"
done

# Kernel messages on the console would split test output lines; they are
# all printed after the tests instead.
dmesg -n 1

if [ "$rc" -eq 0 ]; then
	for t in $TESTS; do
		name=${t%%:*}
		dir=${t#*:}
		echo "VMTEST-PKG-BEGIN $dir"
		(cd "/src/$dir" && VELOFLUX_REQUIRE_PRIV=1 "/tests/$name.test" "$@")
		trc=$?
		echo "VMTEST-PKG-END $dir rc=$trc"
		[ "$trc" -eq 0 ] || rc=1
	done
else
	echo "VMTEST-ERROR setup failed, tests not run"
fi

echo "VMTEST-DMESG-BEGIN"
dmesg
echo "VMTEST-DMESG-END"
echo "VMTEST-RESULT rc=$rc"
sync
poweroff -f
# Only reached if ACPI power-off failed; with -no-reboot qemu exits on this.
echo b >/proc/sysrq-trigger
sleep 60
