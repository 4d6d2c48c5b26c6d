// Package install boots the Debian 12 image of tests/vm/image.sh under qemu
// (TCG, no KVM) and installs VeloFlux in it the way README.md tells an
// operator to: static binaries, deploy/ and README.md copied in,
// deploy/install.sh, a configuration, `systemctl enable --now veloflux`.
//
// The VM has two virtio-net NICs: eth0 on qemu's user network, through
// which the test logs in with ssh (forwarded from 127.0.0.1:2222 of the
// lab's switch namespace), and eth1 on a multi-queue tap in the lab's bridge
// (tests/lab), where the agent attaches XDP in native mode and balances a
// dsr VIP over two backend namespaces for the lab's client. Four queue
// pairs for two vCPUs: virtio-net runs native XDP with its own transmit
// queue per CPU only when it has spare queues for them (with fewer it still
// forwards, on shared, locked queues).
//
// The test then restarts the service under a live TCP stream (the stream
// survives), stops it (the data path stays pinned and forwarding), reboots
// the VM (the service comes back by itself and attaches again) and checks
// the unit with systemd-analyze verify and security.
package install
