// Package deploy tests what deploy/ ships for running VeloFlux in
// containers and monitoring it: the image (deploy/Dockerfile), the compose
// file, and the Prometheus and Alertmanager configuration with its alert
// rules.
//
//   - TestPromtool runs promtool (check rules, test rules on
//     alerts_test.yml, check config) and amtool check-config, from
//     Debian's prometheus and prometheus-alertmanager packages.
//   - TestAlertRules and TestCompose read the files themselves: every alert
//     has a severity, a summary and a description and fires in some unit
//     test; the compose file runs the agent on the host's network, not
//     privileged, with all capabilities dropped but a few, and mounts
//     files that exist. docker-compose, when installed, validates its
//     schema.
//   - TestAlertMetricsExist starts a real agent in a namespace lab, with
//     traffic through its L7 proxy, and checks that every metric the rules
//     select is in its /metrics scrape (a histogram's _bucket, _sum and
//     _count included), and that every label the rules match, group by or
//     print is on those metrics.
//   - TestContainer builds the image from static binaries built here, runs
//     it with podman (on a private storage, with runc when podman's default
//     runtime cannot run containers on the host) on the host's network with
//     only compose.yaml's capabilities and a read-only root, attached to a
//     lab veth in this namespace, and checks /health, the attachment
//     (through the API and netlink), the pins, traffic through the VIP and
//     the L7 proxy, API writes, vfctl, forwarding while no container runs,
//     a new container adopting the pins, and `veloflux detach`. Its
//     "without" subtests drop one capability each, under a seccomp profile
//     like Docker's, and check the failure compose.yaml gives as the reason
//     for that capability.
//   - TestInstallScript runs deploy/install.sh (with DESTDIR, on binaries
//     built here) in a private mount namespace whose /run says whether the
//     host runs systemd, with a stand-in systemctl: without systemd it
//     installs and prints the unit's command line instead of pointing at
//     systemctl; with it, a failing daemon-reload is shown and fails it.
//
// A missing promtool or amtool skips its test, or
// fails it when VELOFLUX_REQUIRE_PRIV=1 (as CI sets it). A missing podman
// always skips TestContainer, with the reason. The agent tests need root,
// and skip without it (fail with VELOFLUX_REQUIRE_PRIV=1).
//
//	go test -count=1 ./tests/deploy/ -v
package deploy
