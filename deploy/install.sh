#!/usr/bin/env bash
# Installs VeloFlux on this host, as a systemd service where systemd runs:
#   make build && sudo deploy/install.sh
# Binaries go to /usr/local/bin, the unit to /etc/systemd/system, and the
# example configuration to /etc/veloflux/veloflux.yaml unless one exists.
#
# DESTDIR=DIR installs the same files under DIR instead (a staging root, as
# with `make install`); the paths the unit and the messages name stay the
# final ones, and the systemd steps still concern this host.
#
# On a host without systemd (no /run/systemd/system: a container, OpenRC,
# runit, ...) the unit is installed all the same, and the script prints the
# command line to run under the host's own supervisor instead. A step that
# fails is reported with its own output and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

destdir=${DESTDIR:-}
bindir=/usr/local/bin
confdir=/etc/veloflux
config=$confdir/veloflux.yaml
unitdir=/etc/systemd/system
docdir=/usr/local/share/doc/veloflux
statedir=/var/lib/veloflux

say() { echo "install.sh: $*"; }
fail() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root"
for b in bin/veloflux bin/vfctl; do
	[ -x "$b" ] || fail "$b missing: run 'make build' first"
done
# The command line systemd would run, so that other supervisors run the same.
exec_start=$(sed -n 's/^ExecStart=//p' deploy/veloflux.service)
caps=$(sed -n 's/^AmbientCapabilities=//p' deploy/veloflux.service)
[ -n "$exec_start" ] && [ -n "$caps" ] ||
	fail "deploy/veloflux.service lacks its ExecStart or AmbientCapabilities line"

install -d -m 0755 "$destdir$bindir" "$destdir$unitdir" "$destdir$docdir"
install -m 0755 bin/veloflux bin/vfctl "$destdir$bindir/"
install -d -m 0755 "$destdir$confdir"
if [ ! -e "$destdir$config" ]; then
	install -m 0600 deploy/veloflux.yaml "$destdir$config"
	say "wrote $config; edit interfaces, pools and VIPs before starting"
fi
# Not fatal: a fresh example needs editing anyway. The errors are printed.
"$destdir$bindir/veloflux" validate --config "$destdir$config" ||
	echo "install.sh: $config does not validate (errors above); fix it before starting" >&2
install -m 0644 deploy/veloflux.service "$destdir$unitdir/veloflux.service"
install -m 0644 README.md "$destdir$docdir/README.md"
# For backends of ipip and gue VIPs: the decapsulator's unit (never enabled
# here) and its example settings (README, "Backends").
install -m 0644 deploy/veloflux-decap.service "$destdir$unitdir/veloflux-decap.service"
install -m 0644 deploy/decap.yaml "$destdir$docdir/decap.yaml"

if [ ! -d /run/systemd/system ]; then
	# systemd creates the state directory (StateDirectory=); others do not.
	install -d -m 0700 "$destdir$statedir"
	say "installed, but this host does not run systemd (no /run/systemd/system): the unit in"
	say "$unitdir is there for when it does. Until then, have the host's supervisor run,"
	say "as root or with the capabilities $caps:"
	echo "  $exec_start"
	say "SIGHUP reloads the configuration; SIGTERM stops the agent and leaves the data path forwarding."
	exit 0
fi
systemctl daemon-reload || fail "systemctl daemon-reload failed (see above): systemd does not know the unit yet"
say "installed; start with: systemctl enable --now veloflux"
say "on a backend of ipip or gue VIPs: copy $docdir/decap.yaml to $confdir/, edit it, then systemctl enable --now veloflux-decap"
