package install

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/lab"
	"github.com/veloflux/veloflux/tests/vm/vmimage"
)

// sshPort is where qemu's user network forwards the guest's sshd, on the
// loopback of the namespace qemu runs in (the lab's switch), so no port of
// the machine is taken.
const sshPort = "2222"

// guest is one booted overlay of the image, reached with ssh.
type guest struct {
	ns      *lab.Host // namespace qemu and ssh run in
	key     string
	console string // the serial console's log
	// control is the socket of the ssh master connection the test's
	// commands share: a new login costs the emulated guest seconds.
	control string
	qemu    *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// bootGuest starts qemu on a throw-away overlay of img: eth0 on qemu's user
// network for ssh, eth1 on the multi-queue tap lanTap, with mac. qemu is
// stopped in t.Cleanup; the console log is printed there when t failed.
func bootGuest(t *testing.T, img vmimage.Image, ns *lab.Host, lanTap, mac string) *guest {
	t.Helper()
	dir := t.TempDir()
	overlay := filepath.Join(dir, "overlay.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
		"-b", img.Disk, overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create overlay of %s: %v\n%s", img.Disk, err, out)
	}
	g := &guest{ns: ns, key: img.Key, console: filepath.Join(dir, "console.log"),
		control: filepath.Join(dir, "ssh"), exited: make(chan struct{})}
	args := []string{
		// Multi-threaded TCG: Debian 12's 6.1 boots in about half the
		// time it takes on one host thread.
		"-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
		"-display", "none", "-vga", "none", "-monitor", "none",
		"-serial", "file:" + g.console,
		"-drive", "file=" + overlay + ",if=virtio,format=qcow2,cache=unsafe",
		"-netdev", "user,id=mgmt,hostfwd=tcp:127.0.0.1:" + sshPort + "-:22",
		"-device", "virtio-net-pci,netdev=mgmt",
		// Four queue pairs for two vCPUs, with an MSI-X vector for each
		// queue and two more (config, control).
		"-netdev", "tap,id=lan,ifname=" + lanTap + ",script=no,downscript=no,queues=4,vhost=off",
		"-device", "virtio-net-pci,netdev=lan,mq=on,vectors=10,mac=" + mac,
	}
	g.qemu = ns.Command(context.Background(), "qemu-system-x86_64", args...)
	// Should the test binary die without its cleanups (go test's timeout
	// panic), qemu goes with it.
	g.qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	g.qemu.Stderr = &stderr
	if err := g.qemu.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	t.Logf("qemu pid %d booting %s (console: %s)", g.qemu.Process.Pid, overlay, g.console)
	go func() {
		g.waitErr = g.qemu.Wait()
		close(g.exited)
	}()
	t.Cleanup(func() {
		g.closeMaster()
		g.stop(t)
		if s := strings.TrimSpace(stderr.String()); s != "" {
			t.Logf("qemu stderr:\n%s", s)
		}
		if t.Failed() {
			g.logConsole(t, 80)
		}
	})
	return g
}

func (g *guest) stop(t *testing.T) {
	select {
	case <-g.exited:
		return
	default:
	}
	_ = g.qemu.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(10 * time.Second):
		_ = g.qemu.Process.Kill()
		<-g.exited
	}
	t.Logf("qemu stopped: %v", g.waitErr)
}

func (g *guest) logConsole(t *testing.T, lines int) {
	b, err := os.ReadFile(g.console)
	if err != nil {
		t.Logf("console log: %v", err)
		return
	}
	all := strings.Split(strings.ReplaceAll(string(b), "\r", ""), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	t.Logf("last %d lines of the VM's console:\n%s", len(all), strings.Join(all, "\n"))
}

func (g *guest) sshArgs() []string {
	return []string{"-i", g.key, "-p", sshPort,
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
		"-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
		"-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=4",
		"-o", "ControlMaster=auto", "-o", "ControlPath=" + g.control, "-o", "ControlPersist=60",
		"root@127.0.0.1"}
}

// closeMaster ends the shared ssh connection, if one is up: before a
// reboot, so that no command waits on a dead connection, and at the end.
func (g *guest) closeMaster() {
	if _, err := os.Stat(g.control); err != nil {
		return
	}
	_ = g.ns.Command(context.Background(), "ssh", "-o", "ControlPath="+g.control, "-O", "exit", "root@127.0.0.1").Run()
}

// run runs script with bash (errexit, pipefail) as root in the guest and
// returns its combined output.
func (g *guest) run(ctx context.Context, script string) (string, error) {
	select {
	case <-g.exited:
		return "", fmt.Errorf("qemu exited: %v", g.waitErr)
	default:
	}
	cmd := g.ns.Command(ctx, "ssh", append(g.sshArgs(), "bash -euo pipefail -s")...)
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("in the VM: %w\nscript:\n%s\noutput:\n%s", err, script, out)
	}
	return string(out), nil
}

// must is run that fails t on error. A command that takes longer than
// slowCommand is logged with its time, so that the log shows where an
// emulated VM spends the test's budget.
func (g *guest) must(t *testing.T, ctx context.Context, script string) string {
	t.Helper()
	start := time.Now()
	out, err := g.run(ctx, script)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > slowCommand {
		first, _, _ := strings.Cut(script, "\n")
		t.Logf("in the VM, %s: %s", took.Round(100*time.Millisecond), first)
	}
	return out
}

// slowCommand is the time above which must logs a command.
const slowCommand = 2 * time.Second

// waitBoot waits until sshd answers in a boot other than notBootID and
// returns that boot's id.
func (g *guest) waitBoot(ctx context.Context, notBootID string) (string, error) {
	var last error
	for {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		out, err := g.run(c, "cat /proc/sys/kernel/random/boot_id")
		cancel()
		id := strings.TrimSpace(out)
		if err == nil && id != "" && id != notBootID {
			return id, nil
		}
		if err == nil {
			err = errors.New("still the boot before")
		}
		last = err
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no ssh login to a new boot: %w (last: %v)", ctx.Err(), last)
		case <-g.exited:
			return "", fmt.Errorf("qemu exited: %v", g.waitErr)
		case <-time.After(2 * time.Second):
		}
	}
}

// upload copies the directory dir to dest in the guest, through tar.
func (g *guest) upload(ctx context.Context, dir, dest string) error {
	tarCmd := exec.CommandContext(ctx, "tar", "-C", dir, "-cf", "-", ".")
	pipe, err := tarCmd.StdoutPipe()
	if err != nil {
		return err
	}
	ssh := g.ns.Command(ctx, "ssh", append(g.sshArgs(), "mkdir -p "+dest+" && tar -C "+dest+" -xf -")...)
	ssh.Stdin = pipe
	var out bytes.Buffer
	ssh.Stdout, ssh.Stderr = &out, &out
	if err := tarCmd.Start(); err != nil {
		return fmt.Errorf("tar %s: %w", dir, err)
	}
	sshErr := ssh.Run()
	tarErr := tarCmd.Wait()
	if err := errors.Join(sshErr, tarErr); err != nil {
		return fmt.Errorf("copy %s to the VM's %s: %w\n%s", dir, dest, err, out.String())
	}
	return nil
}
