package dataplane

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/testenv"
)

func TestMissingCapabilities(t *testing.T) {
	bits := func(caps ...int) capabilitySet {
		var s capabilitySet
		for _, c := range caps {
			s |= 1 << uint(c)
		}
		return s
	}
	for _, tc := range []struct {
		name string
		set  capabilitySet
		want []string
	}{
		{"none", 0, []string{"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}},
		{"net admin only", bits(unix.CAP_NET_ADMIN), []string{"CAP_BPF", "CAP_PERFMON"}},
		{"bpf and perfmon", bits(unix.CAP_BPF, unix.CAP_PERFMON), []string{"CAP_NET_ADMIN"}},
		{"sys admin stands for bpf and perfmon", bits(unix.CAP_SYS_ADMIN, unix.CAP_NET_ADMIN), nil},
		{"all three", bits(unix.CAP_BPF, unix.CAP_PERFMON, unix.CAP_NET_ADMIN), nil},
	} {
		if got := missingCapabilities(tc.set); !slices.Equal(got, tc.want) {
			t.Errorf("%s: missing %v, want %v", tc.name, got, tc.want)
		}
	}

	err := &PrivilegeError{Err: unix.EPERM, UID: 1000, Missing: []string{"CAP_BPF", "CAP_PERFMON"}}
	want := "the data path needs root or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, " +
		"and this process (uid 1000) lacks CAP_BPF and CAP_PERFMON: operation not permitted"
	if err.Error() != want {
		t.Errorf("message:\n got %s\nwant %s", err, want)
	}
	if !errors.Is(err, unix.EPERM) {
		t.Error("the PrivilegeError does not unwrap to its cause")
	}
}

// privilegeChildEnv carries the pin path to TestLoadAsChild, which runs only
// in a child process started by TestLoadWithoutCapabilities.
const privilegeChildEnv = "VELOFLUX_TEST_PRIVILEGE_CHILD_PIN"

// Without root's capabilities, Load says which capabilities are missing
// instead of a bare "permission denied" or "operation not permitted": as
// uid 0 with an empty capability set (creating maps fails) and as an
// unprivileged user (the pin directory cannot even be read).
func TestLoadWithoutCapabilities(t *testing.T) {
	requirePrivileged(t)
	setpriv := testenv.RequireTool(t, "setpriv", "util-linux")
	// The VM tests' guest has BusyBox's setpriv, which cannot drop the
	// bounding set; the host run covers this test there.
	if help, _ := exec.Command(setpriv, "--help").CombinedOutput(); !strings.Contains(string(help), "--bounding-set") {
		t.Skipf("%s cannot drop the capability bounding set (not util-linux's setpriv)", setpriv)
	}
	pin := testPinPath(t)
	if err := os.MkdirAll(pin, 0o700); err != nil {
		t.Fatal(err)
	}
	dropAll := []string{"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"}
	for _, tc := range []struct {
		name  string
		as    []string
		cause string
		lacks string
	}{
		{"root without capabilities", dropAll, "operation not permitted", "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"},
		{"unprivileged user", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, dropAll...),
			"permission denied", "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"},
		// The verifier refuses the balancer with EACCES and a long log.
		{"root without CAP_PERFMON",
			[]string{"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all,+bpf,+net_admin"},
			"load balancer program: load program: permission denied", "CAP_PERFMON"},
	} {
		args := append(slices.Clone(tc.as), "--", os.Args[0], "-test.run=^TestLoadAsChild$", "-test.count=1")
		cmd := exec.Command(setpriv, args...)
		cmd.Env = append(os.Environ(), privilegeChildEnv+"="+pin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: child failed: %v\n%s", tc.name, err, out)
		}
		msg := string(out)
		for _, want := range []string{tc.cause, "needs root or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
			"lacks " + tc.lacks + ":"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%s: Load's error does not say %q:\n%.2000s", tc.name, want, msg)
			}
		}
	}
}

// TestLoadAsChild is TestLoadWithoutCapabilities's child: it prints Load's
// error and fails unless that error is a *PrivilegeError.
func TestLoadAsChild(t *testing.T) {
	pin := os.Getenv(privilegeChildEnv)
	if pin == "" {
		t.Skip("runs only as the child of TestLoadWithoutCapabilities")
	}
	dp, err := Load(Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 1024, MaxVIPs: 8, MaxReals: 8})
	if err == nil {
		dp.Close()
		t.Fatal("Load succeeded without capabilities")
	}
	os.Stdout.WriteString("load error: " + err.Error() + "\n")
	if !errors.As(err, new(*PrivilegeError)) {
		t.Fatalf("Load's error is not a *PrivilegeError: %v", err)
	}
}
