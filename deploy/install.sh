#!/usr/bin/env bash
# Installs VeloFlux on this host as a systemd service:
#   make build && sudo deploy/install.sh
# Binaries go to /usr/local/bin, the unit to /etc/systemd/system, and the
# example configuration to /etc/veloflux/veloflux.yaml unless one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
for b in bin/veloflux bin/vfctl; do
	[ -x "$b" ] || { echo "install.sh: $b missing: run 'make build' first" >&2; exit 1; }
done
install -m 0755 bin/veloflux bin/vfctl /usr/local/bin/
install -d -m 0755 /etc/veloflux
if [ ! -e /etc/veloflux/veloflux.yaml ]; then
	install -m 0600 deploy/veloflux.yaml /etc/veloflux/veloflux.yaml
	echo "install.sh: wrote /etc/veloflux/veloflux.yaml; edit interfaces, pools and VIPs before starting"
fi
/usr/local/bin/veloflux validate --config /etc/veloflux/veloflux.yaml || echo "install.sh: fix the configuration before starting" >&2
install -m 0644 deploy/veloflux.service /etc/systemd/system/veloflux.service
install -d -m 0755 /usr/local/share/doc/veloflux
install -m 0644 README.md /usr/local/share/doc/veloflux/README.md
systemctl daemon-reload 2>/dev/null || true
echo "install.sh: installed; start with: systemctl enable --now veloflux"
