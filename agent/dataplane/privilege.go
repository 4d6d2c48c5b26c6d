package dataplane

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// capability is one Linux capability the data path needs without root.
type capability struct {
	bit  int
	name string
	// sysAdminSuffices: before CAP_BPF and CAP_PERFMON were split off
	// (Linux 5.8), CAP_SYS_ADMIN granted what they grant, and it still does.
	sysAdminSuffices bool
}

// requiredCapabilities are what loading the balancer (CAP_BPF), reading
// kernel pointers and using its probes (CAP_PERFMON) and attaching XDP to
// an interface (CAP_NET_ADMIN) take when the agent does not run as root.
var requiredCapabilities = [...]capability{
	{bit: unix.CAP_BPF, name: "CAP_BPF", sysAdminSuffices: true},
	{bit: unix.CAP_PERFMON, name: "CAP_PERFMON", sysAdminSuffices: true},
	{bit: unix.CAP_NET_ADMIN, name: "CAP_NET_ADMIN"},
}

// capabilitySet is a process's effective capabilities, bit n standing for
// capability number n.
type capabilitySet uint64

func (s capabilitySet) has(bit int) bool { return s&(1<<uint(bit)) != 0 }

// missingCapabilities names the required capabilities that set lacks.
func missingCapabilities(set capabilitySet) []string {
	var missing []string
	for _, c := range requiredCapabilities {
		if set.has(c.bit) || (c.sysAdminSuffices && set.has(unix.CAP_SYS_ADMIN)) {
			continue
		}
		missing = append(missing, c.name)
	}
	return missing
}

// effectiveCapabilities reads the calling thread's effective capability set
// with capget(2). Go runs every thread of a process with the same set.
func effectiveCapabilities() (capabilitySet, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData // version 3 takes two 32-bit halves
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("read this process's capabilities: %w", err)
	}
	return capabilitySet(uint64(data[1].Effective)<<32 | uint64(data[0].Effective)), nil
}

// PrivilegeError is a BPF or pin path operation refused for want of
// privilege, with the capabilities the process lacks.
type PrivilegeError struct {
	Err     error    // what failed, with EPERM or EACCES
	UID     int      // the process's effective user id
	Missing []string // required capabilities not in the effective set
}

// Error leads with what is missing: the cause may end in a long verifier log.
func (e *PrivilegeError) Error() string {
	return fmt.Sprintf("the data path needs root or the capabilities %s, and this process (uid %d) lacks %s: %v",
		joinNames(requiredNames()), e.UID, joinNames(e.Missing), e.Err)
}

func (e *PrivilegeError) Unwrap() error { return e.Err }

// explainPrivilege turns a permission error into a *PrivilegeError naming
// the capabilities the process lacks. Other errors, and permission errors
// of a process that has every required capability (a file mode, an LSM, a
// memlock limit on an old kernel), pass through unchanged.
func explainPrivilege(err error) error {
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		return err
	}
	if errors.As(err, new(*PrivilegeError)) {
		return err
	}
	set, capErr := effectiveCapabilities()
	if capErr != nil {
		return fmt.Errorf("%w (%v)", err, capErr)
	}
	missing := missingCapabilities(set)
	if len(missing) == 0 {
		return err
	}
	return &PrivilegeError{Err: err, UID: os.Geteuid(), Missing: missing}
}

func requiredNames() []string {
	names := make([]string, len(requiredCapabilities))
	for i, c := range requiredCapabilities {
		names[i] = c.name
	}
	return names
}

// joinNames lists names as English prose: "A", "A and B", "A, B and C".
func joinNames(names []string) string {
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
}

// programError is a program the verifier rejected, with its whole log
// (which says why), still unwrapping to the errno: without CAP_PERFMON the
// verifier refuses with EACCES what it accepts from a trusted loader.
type programError struct {
	name string
	verr *ebpf.VerifierError
}

func (e *programError) Error() string { return fmt.Sprintf("load %s program: %+v", e.name, e.verr) }

func (e *programError) Unwrap() error { return e.verr }
