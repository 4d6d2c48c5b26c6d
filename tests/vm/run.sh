#!/usr/bin/env bash
# Runs the BPF data plane's tests as root inside qemu on Debian's own
# kernels, so that the programs are proven against the verifier, helpers and
# map types of the kernels users run, not only the build host's. See doc.go.
#
#   tests/vm/run.sh              # every series in VMTEST_SERIES
#   tests/vm/run.sh 6.12         # only the named series
#
# Environment:
#   VMTEST_SERIES    kernel series to test (default "6.1 6.12")
#   VMTEST_PACKAGES  Go packages whose tests run in the VM
#                    (default "./agent/dataplane ./cmd/vfctl")
#   VMTEST_RUN       -test.run pattern (default: every test)
#   VMTEST_TIMEOUT   seconds one VM may run, boot to power-off (default 1200)
#   VMTEST_CACHE     extracted kernels (default tests/vm/.cache)
#   VMTEST_OUT       console logs (default tests/vm/.out)
#   VMTEST_KEEP=1    keep the work directory (initramfs, binaries)
#
# It installs nothing: missing tools are listed with the apt-get command that
# provides them. Kernels are fetched with `apt-get download`, which needs no
# root, and extracted into the cache; with no package reachable, the newest
# kernel already in the cache is used.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VMTEST_CACHE:-$here/.cache}
out=${VMTEST_OUT:-$here/.out}
vm_timeout=${VMTEST_TIMEOUT:-1200}
read -r -a packages <<<"${VMTEST_PACKAGES:-./agent/dataplane ./cmd/vfctl}"
if (($#)); then
	series_list=("$@")
else
	read -r -a series_list <<<"${VMTEST_SERIES:-6.1 6.12}"
fi
# Debian's generic x86-64 flavour: cloud-amd64 lacks drivers some tests may
# grow to need, and rt-amd64 is not what most users boot.
flavour=amd64
# Built as modules in Debian's kernels but needed by the tests (veth pairs
# in TestPinnedUpgradeKeepsState and TestIPIPNextHopFromFIB). BPF, XDP and
# network namespaces are built in.
vm_modules=(veth)
# qemu's own limit leaves the Go test binaries this much time to print
# their own timeout panic, which names the stuck test.
go_timeout=$((vm_timeout > 180 ? vm_timeout - 120 : vm_timeout / 2))s
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

say() { printf 'vmtest: %s\n' "$*" >&2; }
die() {
	say "error: $*"
	exit 2
}

work=""
# shellcheck disable=SC2317 # reached through trap
cleanup() {
	if [[ -n $work && -d $work ]]; then
		if [[ ${VMTEST_KEEP:-} == 1 ]]; then
			say "work directory kept: $work"
		else
			rm -rf "$work"
		fi
	fi
}
# A signal stops a running VM first: qemu is bounded by timeout(1), but a
# user who interrupts a run wants it gone now.
# shellcheck disable=SC2317 # reached through trap
on_signal() {
	if [[ -n $work && -s $work/qemu.pid ]]; then
		kill "$(cat "$work/qemu.pid")" 2>/dev/null || true
	fi
	# Let the console pipeline finish its writes before cleanup removes
	# the work directory under it.
	wait 2>/dev/null || true
	exit 130
}
trap cleanup EXIT
trap on_signal INT TERM

# --- host tools -------------------------------------------------------------

busybox=""
check_tools() {
	local missing=() hints=()
	need() { # command, what provides it
		if ! command -v "$1" >/dev/null 2>&1; then
			missing+=("$1")
			hints+=("$2")
		fi
	}
	need qemu-system-x86_64 "apt-get install qemu-system-x86"
	need go "the Go toolchain of go.mod (see README.md)"
	need apt-get "Debian's apt"
	need apt-cache "Debian's apt"
	need dpkg-deb "Debian's dpkg"
	need timeout "coreutils"
	need ldd "apt-get install libc-bin"
	# The initramfs has no libc, so only a static busybox runs there; it also
	# writes the cpio archive and unpacks xz modules on the host.
	busybox=$(command -v busybox || true)
	if [[ -z $busybox ]] || ldd "$busybox" >/dev/null 2>&1; then
		missing+=("static busybox")
		hints+=("apt-get install busybox-static")
	fi
	if ((${#missing[@]})); then
		say "missing tools:"
		local i
		for i in "${!missing[@]}"; do
			say "  ${missing[$i]}: ${hints[$i]}"
		done
		exit 2
	fi
}

# --- kernels ----------------------------------------------------------------

# Package names of a series: linux-image-6.1.0-56-amd64-unsigned,
# linux-image-6.12.117+deb12-amd64-unsigned. Other flavours (cloud-amd64,
# rt-amd64) and -dbg packages do not match.
series_regex() { # series, suffix
	local s=${1//./\\.}
	printf '^linux-image-%s\\.[0-9][^-]*(-[0-9]+)?-%s%s$' "$s" "$flavour" "$2"
}

# newest_package prints "name version" of the newest downloadable kernel
# image of the series, the unsigned one where it exists (the signed one
# carries the same kernel and modules, only signed for Secure Boot).
newest_package() {
	local series=$1 suffix name version
	for suffix in -unsigned ""; do
		while read -r name; do
			version=$(apt-cache show --no-all-versions "$name" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
			if [[ -n $version ]]; then
				echo "$name $version"
				return 0
			fi
		done < <(apt-cache pkgnames linux-image- 2>/dev/null | grep -E "$(series_regex "$series" "$suffix")" | sort -rV)
	done
	return 1
}

# cached_kernels lists complete cache entries of the series, newest first.
cached_kernels() {
	local series=$1 d base
	[[ -d $cache/kernels ]] || return 0
	for d in "$cache"/kernels/*/; do
		d=${d%/}
		base=$(basename "$d")
		[[ -f $d/.complete ]] || continue
		grep -qE "$(series_regex "$series" "(-unsigned)?")" <<<"${base%%_*}" && echo "$d"
	done | sort -rV
}

# fetch_kernel downloads and extracts one package into the cache, unless it
# is there already, and prints the cache directory. Only vmlinuz, the config
# and the module tree are kept; other kernels of the series are removed.
fetch_kernel() {
	local series=$1 name=$2 version=$3
	local dir=$cache/kernels/${name}_${version}
	if [[ -f $dir/.complete ]]; then
		echo "$dir"
		return 0
	fi
	mkdir -p "$cache/kernels"
	# In the work directory, so that an interrupted download leaves nothing
	# half-made in the cache.
	local tmp
	tmp=$(mktemp -d "$work/fetch.XXXXXX")
	say "downloading $name $version"
	# apt-get download as root warns that _apt cannot write the directory
	# and downloads unsandboxed, which is what is wanted here.
	if ! (cd "$tmp" && apt-get download -q "$name=$version" >&2 2> >(grep -v 'unsandboxed as root' >&2)); then
		rm -rf "$tmp"
		return 1
	fi
	say "extracting $name"
	local deb
	deb=$(ls "$tmp"/*.deb)
	mkdir "$tmp/root"
	dpkg-deb -x "$deb" "$tmp/root" || {
		rm -rf "$tmp"
		die "dpkg-deb -x $deb failed"
	}
	local release
	release=$(ls "$tmp/root/lib/modules")
	[[ -n $release && -f $tmp/root/boot/vmlinuz-$release ]] || {
		rm -rf "$tmp"
		die "$name has no boot/vmlinuz-<release> matching lib/modules/<release>"
	}
	rm -rf "$dir"
	mkdir -p "$dir"
	mv "$tmp/root/boot/vmlinuz-$release" "$dir/vmlinuz"
	mv "$tmp/root/boot/config-$release" "$dir/config"
	mv "$tmp/root/lib/modules/$release" "$dir/modules"
	echo "$release" >"$dir/release"
	echo "$version" >"$dir/version"
	rm -rf "$tmp"
	touch "$dir/.complete"
	local old
	while read -r old; do
		[[ $old == "$dir" ]] && continue
		say "removing the other cached kernel $(basename "$old")"
		rm -rf "$old"
	done < <(cached_kernels "$series")
	echo "$dir"
}

# kernel_for prints the cache directory of the newest kernel of the series.
kernel_for() {
	local series=$1 pkg dir attempt
	for attempt in 1 2; do
		if pkg=$(newest_package "$series"); then
			# shellcheck disable=SC2086 # "name version"
			if dir=$(fetch_kernel "$series" $pkg); then
				echo "$dir"
				return 0
			fi
			say "could not download $pkg"
		else
			say "apt knows no linux-image-$series.*-$flavour package"
		fi
		# Package lists older than the mirror name kernel versions it no
		# longer carries (security updates replace them): as root, refresh
		# them once and try again.
		[[ $attempt == 1 && $(id -u) -eq 0 ]] || break
		say "refreshing apt's package lists (apt-get update) and trying again"
		apt-get update -q >&2 || break
	done
	say "looking in the cache"
	dir=$(cached_kernels "$series" | head -n1)
	[[ -n $dir ]] || return 1
	say "using cached $(basename "$dir")"
	echo "$dir"
}

# --- initramfs --------------------------------------------------------------

# The initramfs is two concatenated cpio archives, which the kernel unpacks
# in turn: one shared by every kernel (busybox, /init, the test binaries)
# and one per kernel (its modules and /vmtest.conf).
cpio_dir() { # directory, archive
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 >"$2" 2>/dev/null)
}

build_base() {
	local root=$work/base
	mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,tests,src,lib/modules}
	cp "$busybox" "$root/bin/busybox"
	local applet
	for applet in $("$busybox" --list); do
		[[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
	done
	install -m 0755 "$here/init.sh" "$root/init"

	local pkg name dir tests=()
	for pkg in "${packages[@]}"; do
		dir=${pkg#./}
		dir=${dir%/}
		name=$(basename "$dir")
		say "building $pkg tests (static)"
		(cd "$repo" && CGO_ENABLED=0 go test -c -o "$root/tests/$name.test" "./$dir") ||
			die "go test -c ./$dir failed"
		[[ -x $root/tests/$name.test ]] || die "./$dir has no tests"
		mkdir -p "$root/src/$dir"
		# go test runs a package's tests in its directory, with its testdata.
		if [[ -d $repo/$dir/testdata ]]; then
			cp -r "$repo/$dir/testdata" "$root/src/$dir/"
		fi
		tests+=("$name:$dir")
	done
	test_list=${tests[*]}
	cpio_dir "$root" "$work/base.cpio"
}

# module_bytes prints a module file uncompressed: busybox insmod in the VM
# takes plain ELF.
module_bytes() {
	case $1 in
	*.ko.xz) "$busybox" xz -dc "$1" ;;
	*.ko.gz) "$busybox" gzip -dc "$1" ;;
	*.ko.zst)
		command -v zstd >/dev/null || die "$1 is zstd-compressed: apt-get install zstd"
		zstd -qdc "$1"
		;;
	*) cat "$1" ;;
	esac
}

# add_module resolves a module and, first, its dependencies (the depends=
# field of its .modinfo: the package has no modules.dep, depmod writes it
# at install time) into mod_order.
declare -A mod_seen
mod_order=()
add_module() {
	local kdir=$1 name=${2//-/_} base path deps dep
	[[ -n ${mod_seen[$name]:-} ]] && return 0
	mod_seen[$name]=1
	# File names use - or _ interchangeably; module names only _.
	base="/${name//_/[-_]}\\.ko"
	if grep -qE "$base\$" "$kdir/modules/modules.builtin"; then
		return 0
	fi
	path=$(find "$kdir/modules/kernel" -type f | grep -E "$base(\\.(xz|gz|zst))?\$" | head -n1 || true)
	[[ -n $path ]] || die "module $name is neither built into $(cat "$kdir/release") nor in its package"
	deps=$(module_bytes "$path" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' ')
	for dep in $deps; do
		add_module "$kdir" "$dep"
	done
	mod_order+=("$path")
}

build_kernel_cpio() { # kernel dir, archive
	local kdir=$1 root
	root=$work/k-$(basename "$1")
	mkdir -p "$root/lib/modules" "$root/boot"
	# As on an installed Debian kernel, so that the agent reads the tick
	# rate (CONFIG_HZ) instead of measuring it under emulation.
	cp "$kdir/config" "$root/boot/config-$(cat "$kdir/release")"
	mod_seen=()
	mod_order=()
	local m names=()
	for m in "${vm_modules[@]}"; do
		add_module "$kdir" "$m"
	done
	for m in "${mod_order[@]}"; do
		local base
		base=$(basename "$m")
		base=${base%.xz}
		base=${base%.gz}
		base=${base%.zst}
		module_bytes "$m" >"$root/lib/modules/$base"
		names+=("$base")
	done
	{
		printf 'MODULES=%q\n' "${names[*]}"
		printf 'TESTS=%q\n' "$test_list"
		printf 'GO_TIMEOUT=%q\n' "$go_timeout"
		printf 'TEST_RUN=%q\n' "${VMTEST_RUN:-}"
	} >"$root/vmtest.conf"
	cpio_dir "$root" "$2"
}

# failure_details prints the output of each failed top-level test (what Go
# printed from its === RUN line on, less the passing subtests), a Go panic
# such as the test timeout's, and the guest's and the kernel's errors.
failure_details() {
	awk -v max=60 '
	function flush(   i, n) {
		if (bad) {
			n = 0
			for (i = 1; i <= cnt; i++) {
				if (buf[i] ~ /^(=== |[[:space:]]+--- PASS)/) continue
				if (++n > max) { print "... (more in the log)"; break }
				print buf[i]
			}
		}
		cnt = 0; bad = 0
	}
	/^=== RUN   [^\/]+$/ { flush() }
	/^VMTEST-/ { flush(); if ($0 ~ /^VMTEST-ERROR/) print; next }
	/Oops:|BUG:|Kernel panic/ { print }
	/^--- FAIL|^panic:/ { bad = 1 }
	{ buf[++cnt] = $0 }
	END { flush() }
	' "$1"
}

# --- one VM -----------------------------------------------------------------

# Result of the last boot, for the summary.
declare -A res

boot() { # series, kernel dir
	local series=$1 kdir=$2
	local release version
	release=$(cat "$kdir/release")
	version=$(cat "$kdir/version")
	local initrd=$work/initrd-$release.cpio
	build_kernel_cpio "$kdir" "$work/k-$release.cpio"
	cat "$work/base.cpio" "$work/k-$release.cpio" >"$initrd"

	mkdir -p "$out"
	local log=$out/$release.log
	# Two vCPUs, so that per-CPU maps and their sums are exercised, but on
	# one host thread: with multi-threaded TCG, Debian's 6.12 sometimes
	# died at boot with "Oops: int3" in code the other vCPU had just
	# re-patched (static keys are flipped with int3 and text_poke), which
	# MTTCG does not make visible across vCPUs at once (2 of some 160 boots;
	# none in 90 since, on one thread, several with the host loaded).
	# Round-robin TCG costs nothing measurable here.
	# shellcheck disable=SC2054 # the commas are qemu's
	local cmd=(timeout --foreground -k 10 "$vm_timeout"
		qemu-system-x86_64 -accel tcg,thread=single -cpu max -m 1G -smp 2
		-nographic -no-reboot -nic none
		-kernel "$kdir/vmlinuz" -initrd "$initrd"
		-append "console=ttyS0 panic=-1 quiet")
	say "booting $release ($version), at most ${vm_timeout}s; console log: ${log#"$repo"/}"
	local start=$SECONDS qemu_rc
	printf 'VMTEST-HOST %s\n' "${cmd[*]}" >"$log"
	# qemu's console goes to the log whole, less the carriage returns and
	# SeaBIOS's terminal escapes that would glue onto the first line; the
	# terminal gets the verdict lines as they come.
	# The pipeline runs in the background so that a signal to this script
	# interrupts `wait` at once, and on_signal stops qemu through its pid file.
	rm -f "$work/qemu.pid" "$work/qemu.rc"
	{
		# errexit holds in this subshell too: a timeout must not skip the echo.
		rc=0
		"${cmd[@]}" -pidfile "$work/qemu.pid" </dev/null 2>&1 || rc=$?
		echo "$rc" >"$work/qemu.rc"
	} | sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1b[A-Za-z]//g' | tee -a "$log" |
		sed -un -E "/^(--- (PASS|FAIL|SKIP)|VMTEST-(KERNEL|PKG|ERROR|RESULT)|panic:|Kernel panic)/s/^/[$series] /p" &
	wait $! || true
	qemu_rc=$(cat "$work/qemu.rc" 2>/dev/null || echo 255)
	local wall=$((SECONDS - start))

	local marker booted verdict=pass why=""
	marker=$(sed -n 's/^VMTEST-RESULT rc=\([0-9]*\)$/\1/p' "$log" | tail -n1)
	booted=$(sed -n 's/^VMTEST-KERNEL //p' "$log" | head -n1)
	local -i pass fail skip subs
	pass=$(grep -cE '^--- PASS' "$log" || true)
	fail=$(grep -cE '^--- FAIL' "$log" || true)
	skip=$(grep -cE '^--- SKIP' "$log" || true)
	subs=$(grep -cE '^[[:space:]]+--- (PASS|FAIL|SKIP)' "$log" || true)
	if grep -q 'Kernel panic' "$log"; then
		verdict=fail why="kernel panic"
		# An Oops before the first test is the machine, not the tests.
		if ! grep -q '^VMTEST-KERNEL' "$log"; then
			why="kernel panic while booting, before any test"
		fi
	elif ((qemu_rc == 124 || qemu_rc == 137)); then
		verdict=fail why="no power-off within ${vm_timeout}s"
	elif [[ -n $booted && $booted != "$release" ]]; then
		verdict=fail why="booted $booted, not $release"
	elif [[ -z $marker ]]; then
		verdict=fail why="no VMTEST-RESULT line (qemu exit $qemu_rc)"
	elif ((marker != 0)); then
		verdict=fail why="tests failed in the VM (rc=$marker)"
	elif ((pass + fail + skip == 0)); then
		verdict=fail why="no test ran"
	elif ((qemu_rc != 0)); then
		verdict=fail why="qemu exit $qemu_rc"
	fi
	if [[ $verdict == fail ]]; then
		say "$release: FAIL: $why"
		failure_details "$log" | sed "s/^/[$series]   /" >&2
	fi
	# Kernel warnings during the tests are worth a look even when the tests
	# pass; they do not fail the run.
	local warns
	warns=$(sed -n '/^VMTEST-DMESG-BEGIN/,/^VMTEST-DMESG-END/p' "$log" | grep -E 'WARNING:|BUG:|Oops|Call Trace' || true)
	if [[ -n $warns ]]; then
		say "$release: the kernel logged warnings (see $log):"
		local line
		while IFS= read -r line; do
			printf '[%s]   %s\n' "$series" "$line" >&2
		done <<<"$warns"
	fi
	res[$series]="${booted:-?}|$version|$((pass + fail + skip))|$pass|$skip|$fail|$subs|$wall|$verdict"
}

# --- main -------------------------------------------------------------------

check_tools
work=$(mktemp -d "${TMPDIR:-/tmp}/veloflux-vmtest.XXXXXX")

failed=0
declare -A kernel_dir
for series in "${series_list[@]}"; do
	if dir=$(kernel_for "$series"); then
		kernel_dir[$series]=$dir
	else
		say "error: no linux-image-$series.*-$flavour kernel downloadable or cached"
		res[$series]="-|-|0|0|0|0|0|0|unavailable"
		failed=1
	fi
done
test_list=""
((${#kernel_dir[@]} == 0)) || build_base
for series in "${series_list[@]}"; do
	[[ -n ${kernel_dir[$series]:-} ]] || continue
	boot "$series" "${kernel_dir[$series]}"
done

echo
printf '%-7s %-24s %-20s %5s %5s %5s %5s %5s %6s  %s\n' \
	series release package tests pass skip fail subs wall result
for series in "${series_list[@]}"; do
	IFS='|' read -r release version total pass skip fail subs wall verdict <<<"${res[$series]}"
	printf '%-7s %-24s %-20s %5s %5s %5s %5s %5s %5ss  %s\n' \
		"$series" "$release" "$version" "$total" "$pass" "$skip" "$fail" "$subs" "$wall" "$verdict"
	[[ $verdict == pass ]] || failed=1
done
exit "$failed"
