#!/usr/bin/env bash
# Installs the Debian packages a VeloFlux make target needs, and only those
# that are missing, so repeated runs cost nothing.
#   deploy/install-deps.sh build|test|vmtest|vagrant|demo|democluster|bench
set -euo pipefail

declare -A sets=(
	[build]="clang-19 llvm-19 libbpf-dev bpftool"
	[test]="clang-format-19 iproute2 ethtool bpftool curl python3-websockets chromium prometheus prometheus-alertmanager podman runc qemu-system-x86 busybox-static bird2 iptables debootstrap e2fsprogs dosfstools mtools syslinux syslinux-common fdisk qemu-utils openssh-client"
	[vmtest]="qemu-system-x86 busybox-static"
	[vagrant]="vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base rsync"
	[demo]="iproute2 ethtool bpftool curl"
	[democluster]="iproute2 ethtool bpftool curl bird2"
	[bench]="iproute2 ethtool wrk haproxy nftables nginx"
)

want=()
for set in "$@"; do
	pkgs=${sets[$set]:-}
	if [ -z "$pkgs" ]; then
		echo "install-deps: unknown set '$set' (want: ${!sets[*]})" >&2
		exit 2
	fi
	for p in $pkgs; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || want+=("$p")
	done
done
[ ${#want[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing packages (${want[*]}); run as root to install them" >&2
	exit 1
fi
echo "install-deps: installing ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${want[@]}" >/dev/null ||
	{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${want[@]}" >/dev/null; }
# Debian starts these on install. The benchmarks run their own nginx and
# HAProxy, and a stray nginx would hold :80; the tests only need promtool
# and amtool, and a Prometheus server would hold :9090, the agent's API
# port. tests/cluster runs BIRD with its own configuration in a namespace;
# the host's needs no BGP daemon. tests/vm/vagrant starts its own libvirtd
# and virtlogd, and stops them when done.
for svc in nginx haproxy prometheus prometheus-alertmanager bird2 libvirt-daemon-system; do
	if printf '%s\n' "${want[@]}" | grep -qx "$svc" && command -v systemctl >/dev/null; then
		units=$svc
		[ "$svc" = bird2 ] && units=bird
		[ "$svc" = libvirt-daemon-system ] &&
			units="libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket virtlogd.service virtlogd.socket virtlogd-admin.socket"
		# shellcheck disable=SC2086 # a list of units
		systemctl disable --now $units >/dev/null 2>&1 || true
	fi
done
