package vagrant

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/testenv"
	"github.com/veloflux/veloflux/tests/vm/vmimage"
)

// libvirtSocket is where the system libvirtd listens; the test's daemon
// does too, so no other may run.
const libvirtSocket = "/run/libvirt/libvirt-sock"

// The names vagrant-libvirt gives its management network and storage pool
// unless a Vagrantfile says otherwise.
const (
	managementNetwork = "vagrant-libvirt"
	storagePool       = "default"
)

func TestVagrantfileUpInstallDestroy(t *testing.T) {
	testenv.RequireRoot(t, "run libvirtd and boot a VM")
	for tool, pkg := range map[string]string{
		"vagrant": "vagrant", "virsh": "libvirt-clients", "libvirtd": "libvirt-daemon-system",
		"virtlogd": "libvirt-daemon-system", "rsync": "rsync", "dnsmasq": "dnsmasq-base", "ip": "iproute2",
	} {
		if tool == "dnsmasq" {
			// libvirt runs it by path; dnsmasq-base does not put it on PATH for every user.
			if _, err := os.Stat("/usr/sbin/dnsmasq"); err == nil {
				continue
			}
		}
		testenv.RequireTool(t, tool, pkg)
	}
	if out, err := exec.Command("vagrant", "plugin", "list").CombinedOutput(); err != nil ||
		!strings.Contains(string(out), "vagrant-libvirt") {
		testenv.SkipOrFail(t, fmt.Sprintf("vagrant has no vagrant-libvirt plugin (apt-get install --no-install-recommends vagrant-libvirt): %v %s", err, out))
	}
	if err := exec.Command("virsh", "-c", "qemu:///system", "version").Run(); err == nil {
		testenv.SkipOrFail(t, "a libvirtd is running already; the test runs its own, in a network namespace")
	}
	img := vmimage.ForTest(t)
	checkout := vmimage.PayloadForTest(t)
	box := vagrantfileBox(t, filepath.Join(checkout, "deploy/Vagrantfile"))
	ctx, cancel := context.WithTimeout(t.Context(), 9*time.Minute)
	defer cancel()

	ns := "vfvm-virt-" + randomHex(t)
	runOK(t, exec.Command("ip", "netns", "add", ns))
	t.Cleanup(func() { logErr(t, exec.Command("ip", "netns", "del", ns).Run(), "delete namespace "+ns) })
	runOK(t, exec.Command("ip", "-n", ns, "link", "set", "lo", "up"))

	scratch := t.TempDir()
	existed := map[string]bool{
		"network": virshOK("net-info", managementNetwork),
		"pool":    virshOK("pool-info", storagePool),
	}
	// Cleanups run last-in first-out: daemons stop after the VM, network
	// and pool are gone.
	startDaemon(t, ns, filepath.Join(scratch, "virtlogd.log"), "virtlogd")
	startDaemon(t, ns, filepath.Join(scratch, "libvirtd.log"), "libvirtd")
	waitLibvirt(t, ctx)
	t.Cleanup(func() { removeLibvirtObjects(t, existed) })

	v := &vagrant{ns: ns, dir: filepath.Join(checkout, "deploy"), env: []string{
		"VAGRANT_HOME=" + filepath.Join(scratch, "vagrant.d"),
		"VAGRANT_DOTFILE_PATH=" + filepath.Join(scratch, "dot"),
		"VAGRANT_CHECKPOINT_DISABLE=1",
		"VAGRANT_DEFAULT_PROVIDER=libvirt",
		"LIBVIRT_DEFAULT_URI=qemu:///system",
	}}
	// TCG unless KVM is asked for: where this runs in a virtual machine,
	// nested KVM may hang or fail, and /dev/kvm opening for root says
	// nothing of whether libvirt's qemu user may open it (a 0600
	// /dev/kvm refuses it). The other VM tests use TCG too.
	if os.Getenv("VELOFLUX_VM_KVM") != "1" || !kvmUsable() {
		v.env = append(v.env, "VELOFLUX_VM_EMULATE=1")
		t.Log("VELOFLUX_VM_EMULATE=1 (qemu TCG); VELOFLUX_VM_KVM=1 asks for KVM where /dev/kvm works")
	}

	v.must(t, ctx, "box", "add", "--name", box, img.Box)
	t.Cleanup(func() {
		if _, err := v.run(context.Background(), "box", "remove", "--force", "--provider", "libvirt", box); err != nil {
			t.Errorf("vagrant box remove %s: %v", box, err)
		}
	})
	start := time.Now()
	t.Cleanup(func() {
		if _, err := v.run(context.Background(), "destroy", "-f"); err != nil {
			t.Errorf("vagrant destroy -f: %v", err)
		}
	})
	up := v.must(t, ctx, "up", "--provider", "libvirt")
	t.Logf("vagrant up took %s:\n%s", time.Since(start).Round(time.Second), up)
	if !strings.Contains(up, "no toolchain installed") {
		t.Errorf("the Vagrantfile's provisioning did not skip the toolchain with binaries in bin/:\n%s", up)
	}

	out := v.ssh(t, ctx, guestChecks(readmeInstallCommand(t, filepath.Join(checkout, "README.md"))))
	for _, want := range []string{"installed; start with: systemctl enable --now veloflux", "Active: active (running)",
		"agent running", "health 200", "link eth0 attached"} {
		if !strings.Contains(out, want) {
			t.Errorf("the checks in the VM did not print %q:\n%s", want, out)
		}
	}
}

// guestChecks is the script the test runs in the VM as root: the install
// as the README has it, a configuration with XDP native on eth0, the
// service, and what an operator looks at.
func guestChecks(installCmd string) string {
	return `set -euo pipefail
test ! -e /usr/local/go
cd /veloflux
` + installCmd + `
cat >/etc/veloflux/veloflux.yaml <<'VELOFLUX_YAML'
dataplane:
  interfaces: [eth0]
  xdp_mode: native
  conntrack_size: 65536
pools:
  - name: web
    health_check: {type: tcp, interval: 1s, timeout: 500ms}
    backends:
      - {address: 192.0.2.10, port: 80}
vips:
  - {address: 198.51.100.80, port: 80, protocol: tcp, mode: dsr, pool: web}
VELOFLUX_YAML
veloflux validate --config /etc/veloflux/veloflux.yaml
systemctl enable --now veloflux
code=
for i in $(seq 90); do
	code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:9090/health || true)
	[ "$code" = 200 ] && break
	sleep 1
done
echo "health $code"
systemctl status --no-pager veloflux
journalctl -u veloflux -o cat --no-pager | tail -n 20
vfctl status
vfctl -o json status | grep -q '"interface": *"eth0"' && ! vfctl -o json status | grep -q '"detached": *true' &&
	echo "link eth0 attached"
ip -d link show dev eth0 | grep -E 'xdp|prog'
`
}

// vagrant runs vagrant in the test's namespace and directory.
type vagrant struct {
	ns, dir string
	env     []string
}

func (v *vagrant) run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", v.ns, "vagrant"}, args...)...)
	cmd.Dir = v.dir
	cmd.Env = append(os.Environ(), v.env...)
	out := &stampedWriter{start: time.Now()}
	cmd.Stdout, cmd.Stderr = out, out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("vagrant %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return out.String(), nil
}

// stampedWriter keeps a command's output with the seconds since start at
// the head of each line, so that a slow step shows in the test's log.
type stampedWriter struct {
	mu      sync.Mutex
	start   time.Time
	buf     bytes.Buffer
	midLine bool
}

func (w *stampedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		if !w.midLine {
			fmt.Fprintf(&w.buf, "[%5.1fs] ", time.Since(w.start).Seconds())
		}
		line, rest, found := bytes.Cut(p, []byte("\n"))
		w.buf.Write(line)
		if found {
			w.buf.WriteByte('\n')
		}
		w.midLine = !found
		p = rest
	}
	return n, nil
}

func (w *stampedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func (v *vagrant) must(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	out, err := v.run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ssh runs script as root in the VM through `vagrant ssh`.
func (v *vagrant) ssh(t *testing.T, ctx context.Context, script string) string {
	t.Helper()
	enc := base64.StdEncoding.EncodeToString([]byte(script))
	return v.must(t, ctx, "ssh", "-c", "echo "+enc+" | base64 -d | sudo bash")
}

// vagrantfileBox returns the box the Vagrantfile asks for.
func vagrantfileBox(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*config\.vm\.box\s*=\s*"([^"]+)"`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s sets no config.vm.box", path)
	}
	return string(m[1])
}

// readmeInstallCommand returns the line of README.md's "Install on a host"
// that runs deploy/install.sh.
func readmeInstallCommand(t *testing.T, readme string) string {
	t.Helper()
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Install on a host\n")
	if !ok {
		t.Fatal(`README.md has no "## Install on a host" section`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	m := regexp.MustCompile(`(?m)^(sudo deploy/install\.sh)\b`).FindStringSubmatch(section)
	if m == nil {
		t.Fatalf(`README.md's "Install on a host" has no line starting "sudo deploy/install.sh"`)
	}
	return m[1]
}

// startDaemon runs name in the foreground inside ns, its output in logPath,
// and stops it by PID in t.Cleanup (printing its log if t failed).
func startDaemon(t *testing.T, ns, logPath, name string) {
	t.Helper()
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns, name)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Should the test binary die without its cleanups (go test's timeout
	// panic), the daemon goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Logf("%s pid %d", name, cmd.Process.Pid)
	t.Cleanup(func() {
		defer logf.Close()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("%s (pid %d) ignored SIGTERM for 15s; killed", name, cmd.Process.Pid)
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s log:\n%s", name, lastLines(string(b), 40))
		}
	})
}

func waitLibvirt(t *testing.T, ctx context.Context) {
	t.Helper()
	for i := 0; ; i++ {
		if _, err := os.Stat(libvirtSocket); err == nil && virshOK("version") {
			return
		}
		if i == 150 || ctx.Err() != nil {
			t.Fatalf("libvirtd did not answer on %s within 30s", libvirtSocket)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// removeLibvirtObjects removes what vagrant-libvirt left in libvirt after
// destroy: the box's volumes, and the network and pool it created unless
// they existed before the test.
func removeLibvirtObjects(t *testing.T, existed map[string]bool) {
	var errs []error
	if virshOK("pool-info", storagePool) {
		vols, err := virsh("vol-list", "--pool", storagePool)
		if err != nil {
			errs = append(errs, err)
		}
		for _, vol := range volumeNames(vols) {
			// Volumes of the domain and of the box (..._vagrant_box_image_...).
			if strings.Contains(vol, "_vagrant_box_image_") || strings.HasPrefix(vol, "deploy_") {
				if _, err := virsh("vol-delete", "--pool", storagePool, vol); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if !existed["pool"] {
			_, err1 := virsh("pool-destroy", storagePool)
			_, err2 := virsh("pool-undefine", storagePool)
			errs = append(errs, err1, err2)
		}
	}
	if !existed["network"] && virshOK("net-info", managementNetwork) {
		if out, _ := virsh("net-info", managementNetwork); regexp.MustCompile(`(?m)^Active:\s+yes`).MatchString(out) {
			_, err := virsh("net-destroy", managementNetwork)
			errs = append(errs, err)
		}
		_, err := virsh("net-undefine", managementNetwork)
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		t.Errorf("remove libvirt objects: %v", err)
	}
}

// volumeNames returns the first column of `virsh vol-list`'s table (libvirt
// 9's virsh has no --name there).
func volumeNames(table string) []string {
	var names []string
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] == "Name" || strings.HasPrefix(f[0], "---") {
			continue
		}
		names = append(names, f[0])
	}
	return names
}

func virsh(args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

func virshOK(args ...string) bool {
	_, err := virsh(args...)
	return err == nil
}

// kvmUsable reports whether /dev/kvm opens for reading and writing.
func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

func runOK(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
}

func logErr(t *testing.T, err error, what string) {
	if err != nil {
		t.Errorf("%s: %v", what, err)
	}
}

func randomHex(t *testing.T) string {
	b := make([]byte, 2)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestVolumeNames(t *testing.T) {
	table := ` Name                                                              Path
-------------------------------------------------------------------------------------------------
 debian-VAGRANTSLASH-bookworm64_vagrant_box_image_0_1_box.img   /var/lib/libvirt/images/debian-VAGRANTSLASH-bookworm64_vagrant_box_image_0_1_box.img
 deploy_default.img                                                /var/lib/libvirt/images/deploy_default.img

`
	got := strings.Join(volumeNames(table), " ")
	want := "debian-VAGRANTSLASH-bookworm64_vagrant_box_image_0_1_box.img deploy_default.img"
	if got != want {
		t.Errorf("volumeNames = %q, want %q", got, want)
	}
	if got := volumeNames(" Name   Path\n------------\n\n"); len(got) != 0 {
		t.Errorf("volumeNames of an empty pool = %q", got)
	}
}
