package lab

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsRunDir is where iproute2 keeps named namespaces; using it makes
// `ip netns list/exec` see ours.
const netnsRunDir = "/run/netns"

// runInNS runs fn on a dedicated OS thread switched into ns (left as is
// when ns is netns.None(), for fn that switches itself). A fresh
// goroutine is used so the caller's thread (which may itself be locked)
// is never touched. If the thread cannot be switched back it is left
// locked, and the runtime destroys a thread whose goroutine exits while
// locked, so a thread in the wrong namespace never returns to the pool.
func runInNS(ns netns.NsHandle, fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var res result
		defer func() { done <- res }()

		orig, err := netns.Get()
		if err != nil {
			res.err = fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if ns.IsOpen() {
			if err := netns.Set(ns); err != nil {
				res.err = fmt.Errorf("enter netns %s: %w", ns, err)
				return
			}
		}
		func() {
			defer func() { res.panic = recover() }()
			res.err = fn()
		}()
		if err := netns.Set(orig); err != nil {
			res.err = errors.Join(res.err, fmt.Errorf("restore netns %s: %w", orig, err))
			return
		}
		runtime.UnlockOSThread()
	}()
	res := <-done
	if res.panic != nil {
		panic(res.panic) // re-raise in the caller's goroutine so it is attributable
	}
	return res.err
}

// prepareRunDir makes /run/netns a shared mount point, as `ip netns add`
// does, so namespace bind mounts propagate to (and unmounts reach) the
// private mount namespaces `ip netns exec` creates; otherwise a running
// `ip netns exec` child could pin a deleted namespace.
func prepareRunDir() error {
	if err := os.MkdirAll(netnsRunDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", netnsRunDir, err)
	}
	err := unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		if err := unix.Mount(netnsRunDir, netnsRunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind-mount %s onto itself: %w", netnsRunDir, err)
		}
		err = unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s shared: %w", netnsRunDir, err)
	}
	return nil
}

// createNamedNS creates a network namespace bind-mounted at
// /run/netns/name and returns an open handle to it.
func createNamedNS(name string) (netns.NsHandle, error) {
	var created netns.NsHandle
	err := runInNS(netns.None(), func() error {
		var err error
		// NewNamed unshares this (locked) thread into the new namespace;
		// runInNS switches it back afterwards. Leaving the thread to die
		// locked instead is not enough: if it is the main thread the
		// runtime parks it rather than exiting, and /proc/self/ns/net would
		// then report the new namespace for the whole process.
		created, err = netns.NewNamed(name)
		return err
	})
	if err != nil {
		return netns.None(), fmt.Errorf("create netns %q: %w", name, err)
	}
	return created, nil
}

// currentNS opens the namespace of the calling goroutine's thread, i.e.
// the process's namespace in any sane program. /proc/self/ns/net is not
// used: it follows the main thread, which is not necessarily where the
// caller runs.
func currentNS() (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	h, err := netns.Get()
	if err != nil {
		return netns.None(), fmt.Errorf("open current netns: %w", err)
	}
	return h, nil
}

// deleteNamedNS unmounts and removes /run/netns/name. A half-created entry
// (file without mount) and a missing one are both fine.
func deleteNamedNS(name string) error {
	p := filepath.Join(netnsRunDir, name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %q: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %q: %w", p, err)
	}
	return nil
}

// namedNSWithPrefix lists /run/netns entries starting with prefix.
func namedNSWithPrefix(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsRunDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", netnsRunDir, err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// writeSysctls writes key=value pairs under /proc/sys. Must run inside the
// target namespace: /proc/sys/net resolves against the opening thread's
// namespace.
func writeSysctls(kv [][2]string) error {
	for _, e := range kv {
		p := "/proc/sys/" + strings.ReplaceAll(e[0], ".", "/")
		if err := os.WriteFile(p, []byte(e[1]), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", e[0], e[1], err)
		}
	}
	return nil
}

// readSysctl reads one value under /proc/sys (inside the target namespace).
func readSysctl(key string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(key, ".", "/"))
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", key, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// ethtoolValue is struct ethtool_value from <linux/ethtool.h>.
type ethtoolValue struct {
	cmd  uint32
	data uint32
}

// ifreqData is struct ifreq with the ifr_data member of the union in use.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(uintptr(0))]byte
}

// ethtool issues one SIOCETHTOOL ethtool_value command on ifname in the
// calling thread's namespace and returns the value the kernel wrote back.
func ethtool(ifname string, cmd, data uint32) (uint32, error) {
	if len(ifname) >= unix.IFNAMSIZ {
		return 0, fmt.Errorf("ethtool %q: interface name too long", ifname)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("ethtool %q: socket: %w", ifname, err)
	}
	defer unix.Close(fd)
	val := ethtoolValue{cmd: cmd, data: data}
	var ifr ifreqData
	copy(ifr.name[:], ifname)
	ifr.data = unsafe.Pointer(&val)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
		return 0, fmt.Errorf("ethtool %q cmd %#x: %w", ifname, cmd, errno)
	}
	runtime.KeepAlive(&val)
	return val.data, nil
}

// disableTxChecksum is `ethtool -K ifname tx off`. veth defaults to
// CHECKSUM_PARTIAL, i.e. the L4 checksum is never filled in on the wire;
// a frame bounced with XDP_TX then reaches the backend with a bad checksum
// and is dropped. Dependent offloads (TSO) are turned off by the kernel.
func disableTxChecksum(ifname string) error {
	_, err := ethtool(ifname, unix.ETHTOOL_STXCSUM, 0)
	return err
}

// txChecksumEnabled is `ethtool -k ifname | grep tx-checksumming`.
func txChecksumEnabled(ifname string) (bool, error) {
	v, err := ethtool(ifname, unix.ETHTOOL_GTXCSUM, 0)
	return v != 0, err
}

// loadXDPPass loads `r0 = XDP_PASS; exit`. On veth, frames sent with
// XDP_TX are delivered through the peer's XDP/NAPI receive path; when the
// peer has no XDP program they are silently dropped on recent kernels
// (enabling GRO on the peer was not enough), so the bridge-side peer of
// the balancer gets this no-op program.
func loadXDPPass() (*ebpf.Program, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "vf_lab_pass",
		Type: ebpf.XDP,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 2), // XDP_PASS
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return nil, fmt.Errorf("load XDP_PASS program: %w", err)
	}
	return prog, nil
}
