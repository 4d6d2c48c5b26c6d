package agenttest

import (
	"bytes"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Process is a child of the test (the agent, or another command of its
// binary) whose output is copied to the test log line by line and kept, so
// that a test can wait for a line. Its methods fail the test it was started
// for.
type Process struct {
	Name string

	tb   testing.TB
	cmd  *exec.Cmd
	log  *logSink
	done chan struct{}
	err  error // cmd.Wait's result, valid after done
	// stopped is set when the test itself ends the process.
	stopped atomic.Bool
}

// Start runs cmd (not tied to a context: the test decides when it stops)
// with its output going to the test log, prefixed with name. tb's Cleanup
// stops it (SIGTERM, then SIGKILL) if it still runs. cmd runs in the network
// namespace it was built for; with `ip netns exec`, which execs the command,
// the process is the command itself.
func Start(tb testing.TB, name string, cmd *exec.Cmd) (*Process, error) {
	p := &Process{Name: name, tb: tb, cmd: cmd, log: &logSink{tb: tb, prefix: name, changed: make(chan struct{})},
		done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.log, p.log
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	tb.Cleanup(func() {
		if !p.Exited() {
			p.Stop()
		}
		p.log.close()
	})
	return p, nil
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the process ended (exec.Cmd.Wait's error); nil while it runs.
func (p *Process) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// StoppedByTest reports whether Stop was called: an exit the test asked for.
func (p *Process) StoppedByTest() bool { return p.stopped.Load() }

// Signal sends sig to the process.
func (p *Process) Signal(sig syscall.Signal) {
	p.tb.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.tb.Fatalf("%s: send %v: %v", p.Name, sig, err)
	}
}

// Stop sends SIGTERM and waits for the exit (SIGKILL after 15 s). It returns
// the exit code; stopping a stopped process returns its code again.
func (p *Process) Stop() int {
	p.tb.Helper()
	p.stopped.Store(true)
	if !p.Exited() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.tb.Errorf("%s: no exit 15s after SIGTERM; killing it", p.Name)
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return p.cmd.ProcessState.ExitCode()
}

// Wait waits for the process to exit on its own and returns the exit code.
func (p *Process) Wait(timeout time.Duration) int {
	p.tb.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		p.tb.Fatalf("%s: still running after %s", p.Name, timeout)
		return -1
	}
}

// WaitLog waits until a line containing substr appears at or after line
// from, and returns its index.
func (p *Process) WaitLog(substr string, from int, timeout time.Duration) int {
	p.tb.Helper()
	if i, ok := p.log.waitFor(substr, from, timeout, p.done); ok {
		return i
	}
	if p.Exited() {
		p.tb.Fatalf("%s exited (%v) before logging %q", p.Name, p.err, substr)
	}
	p.tb.Fatalf("%s: no log line with %q within %s", p.Name, substr, timeout)
	return -1
}

// LogLines is the number of complete lines logged so far: a mark for
// LogSince and WaitLog.
func (p *Process) LogLines() int { return p.log.len() }

// LogSince joins the lines logged from line from on.
func (p *Process) LogSince(from int) string { return p.log.since(from) }

// LogText is everything logged so far.
func (p *Process) LogText() string { return p.log.text() }

// logSink collects a process's output and copies each line to the test log
// until closed (the test may be over by then).
type logSink struct {
	tb     testing.TB
	prefix string

	mu      sync.Mutex
	partial []byte
	lines   []string
	changed chan struct{} // closed and replaced on every write
	closed  bool
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.partial = append(s.partial, p...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		line := string(s.partial[:i])
		s.partial = s.partial[i+1:]
		s.lines = append(s.lines, line)
		if !s.closed {
			s.tb.Logf("%s: %s", s.prefix, line)
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	return len(p), nil
}

func (s *logSink) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.partial) > 0 && !s.closed {
		s.tb.Logf("%s: %s", s.prefix, s.partial)
	}
	s.closed = true
}

func (s *logSink) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lines)
}

func (s *logSink) since(from int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if from > len(s.lines) {
		return ""
	}
	return strings.Join(s.lines[from:], "\n")
}

func (s *logSink) text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.lines, "\n") + "\n" + string(s.partial)
}

// find returns the first line at or after from that contains substr.
func (s *logSink) find(substr string, from int) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := from; i < len(s.lines); i++ {
		if strings.Contains(s.lines[i], substr) {
			return i, true
		}
	}
	return -1, false
}

// waitFor waits for a line containing substr at or after line from, until
// timeout or until done is closed (then it looks once more at what the last
// writes left).
func (s *logSink) waitFor(substr string, from int, timeout time.Duration, done <-chan struct{}) (int, bool) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		changed := s.changed
		s.mu.Unlock()
		if i, ok := s.find(substr, from); ok {
			return i, true
		}
		select {
		case <-changed:
		case <-done:
			return s.find(substr, from)
		case <-deadline.C:
			return -1, false
		}
	}
}
