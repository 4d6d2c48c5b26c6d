package deploy

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// decapCaps are what the image needs to run `veloflux decap`: the agent's
// less NET_BIND_SERVICE (it binds no port).
var decapCaps = []string{"BPF", "PERFMON", "NET_ADMIN"}

// testDecapContainer runs `veloflux decap` from the image as the Dockerfile
// shows it (host network, read-only root, all capabilities dropped but
// decapCaps, Docker's seccomp profile) on the lab's veth in this
// namespace: it attaches and pins, vfctl in the container reads its
// counters, SIGTERM leaves it attached, and `veloflux decap detach` run
// with no capability at all removes it.
func testDecapContainer(t *testing.T, pm *podman, l *lab.Lab) {
	dir := t.TempDir()
	bpffs := filepath.Dir(agenttest.MountBPFFS(t, dir))
	etc := filepath.Join(dir, "etc")
	if err := os.Mkdir(etc, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("decap:\n  interfaces: [%s]\n  local: [%q]\n", l.Balancer.IfName, l.Balancer.Addr4)
	if err := os.WriteFile(filepath.Join(etc, "decap.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("vfdecap-%d", time.Now().UnixNano())
	args := []string{"run", "--detach", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
		"--cap-drop", "ALL", "--security-opt", "seccomp=" + pm.dockerSeccomp(t)}
	for _, c := range decapCaps {
		args = append(args, "--cap-add", c)
	}
	args = append(append(args, pm.limits()...), "-v", bpffs+":/sys/fs/bpf", "-v", etc+":/etc/veloflux",
		imageName, "decap", "--config", "/etc/veloflux/decap.yaml")
	if out, err := pm.run(t, time.Minute, args...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := pm.run(t, time.Minute, "logs", name); err == nil {
			t.Logf("%s log:\n%s", name, out)
		}
		if out, err := pm.run(t, time.Minute, "rm", "--force", "--time", "10", name); err != nil {
			t.Errorf("%v\n%s", err, out)
		}
	})
	pins := filepath.Join(bpffs, "veloflux-decap")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(pins, "link_xdp_"+l.Balancer.IfName)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			logs, _ := pm.run(t, time.Minute, "logs", name)
			t.Fatalf("no pinned link under %s within 30s:\n%s", pins, logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	id := xdpProgID(t, l.Balancer.IfName)
	if id == 0 {
		t.Fatalf("no XDP program on %s with the decapsulator running", l.Balancer.IfName)
	}
	out, err := pm.run(t, time.Minute, "exec", name, "/usr/local/bin/vfctl", "decap")
	t.Logf("vfctl decap:\n%s", out)
	if err != nil || !strings.Contains(out, "local addresses:  "+l.Balancer.Addr4.String()) || !strings.Contains(out, "gue:") {
		t.Errorf("vfctl decap in the container: %v", err)
	}
	if out, err := pm.run(t, time.Minute, "stop", "--time", "10", name); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if code, err := pm.run(t, time.Minute, "inspect", "--format", "{{.State.ExitCode}}", name); err != nil || code != "0" {
		t.Errorf("veloflux decap after SIGTERM: exit code %q %v; want 0", code, err)
	}
	if got := xdpProgID(t, l.Balancer.IfName); got != id {
		t.Errorf("after SIGTERM: XDP program %d on %s, want %d still there", got, l.Balancer.IfName, id)
	}
	out, err = pm.run(t, time.Minute, append(append([]string{"run", "--rm", "--network", "none", "--read-only",
		"--cap-drop", "ALL"}, pm.limits()...), "-v", bpffs+":/sys/fs/bpf", imageName, "decap", "detach")...)
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%v\n%s", err, out)
	}
	if err != nil || !strings.Contains(out, "detached") {
		t.Errorf("veloflux decap detach in the image: %v\n%s", err, out)
	}
	if got := xdpProgID(t, l.Balancer.IfName); got != 0 {
		t.Errorf("after veloflux decap detach: XDP program %d still on %s", got, l.Balancer.IfName)
	}
}
