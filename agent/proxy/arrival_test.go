package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// followedPair is a loopback TCP pair whose server side reads through an
// arrival watch of its own, as the proxy's client connections do.
func followedPair(t *testing.T) (client *net.TCPConn, server *trackedConn, w *arrivalWatch) {
	t.Helper()
	w, err := newArrivalWatch(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.stop)
	c, tc := followedPairOn(t, w)
	return c, tc, w
}

// followedPairOn is followedPair on the watch w.
func followedPairOn(t *testing.T, w *arrivalWatch) (client *net.TCPConn, server *trackedConn) {
	t.Helper()
	c, s := tcpPair(t)
	tc := &trackedConn{watchedIO: watchedIO{Conn: s}, set: &connSet{}}
	tc.follow(w)
	if tc.watched == nil {
		t.Fatal("the connection could not be followed")
	}
	t.Cleanup(func() { tc.Close() })
	return c, tc
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// A read waits for data sent later, and each read after it returns what
// arrived since, in order: data sent while nobody was reading (a pipelined
// request) is read at once, never waited for.
func TestArrivalWatchedReads(t *testing.T) {
	c, s, _ := followedPair(t)
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	go func() {
		time.Sleep(50 * time.Millisecond)
		c.Write([]byte("first"))
	}()
	b := make([]byte, 64)
	if n, err := s.Read(b); err != nil || string(b[:n]) != "first" {
		t.Fatalf("read of data sent later: %q, %v", b[:n], err)
	}
	for i, msg := range []string{"second", "third"} {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // arrived, and seen by the watch, before the read
		s.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := s.Read(b)
		if err != nil || string(b[:n]) != msg {
			t.Fatalf("read %d of data already there: %q, %v", i, b[:n], err)
		}
	}
	// A read into a buffer too small for what arrived leaves the rest in
	// the socket, and the next read takes it without waiting for more.
	c.Write([]byte("0123456789"))
	small := make([]byte, 4)
	var got []byte
	for len(got) < 10 {
		s.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := s.Read(small)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, small[:n]...)
	}
	if string(got) != "0123456789" {
		t.Fatalf("read in small pieces: %q", got)
	}
}

// A waiting read ends at its deadline, as a timeout; a deadline moved
// while it waits applies; the client's close ends it with io.EOF, and every
// read after that too.
func TestArrivalWatchedReadsEnd(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		_, s, _ := followedPair(t)
		s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := s.Read(make([]byte, 8)); !isTimeoutErr(err) {
			t.Fatalf("nothing by the deadline: %v, want a timeout", err)
		}
	})
	t.Run("deadline-moved", func(t *testing.T) {
		c, s, _ := followedPair(t)
		s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		go func() {
			time.Sleep(30 * time.Millisecond)
			s.SetReadDeadline(time.Now().Add(5 * time.Second))
			time.Sleep(200 * time.Millisecond)
			c.Write([]byte("late"))
		}()
		b := make([]byte, 8)
		if n, err := s.Read(b); err != nil || string(b[:n]) != "late" {
			t.Fatalf("read after the deadline was extended: %q, %v", b[:n], err)
		}
	})
	// A deadline moved while a read waits is the one that ends it: a
	// later one is kept to (the timer set for the first is left to fire,
	// and the wait it wakes sets it again for what is left), an earlier
	// one takes effect.
	for _, tc := range []struct {
		name          string
		first, second time.Duration
	}{
		{"deadline-moved-later-then-reached", 100 * time.Millisecond, 300 * time.Millisecond},
		{"deadline-moved-earlier", 5 * time.Second, 100 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, s, _ := followedPair(t)
			began := time.Now()
			s.SetReadDeadline(began.Add(tc.first))
			go func() {
				time.Sleep(30 * time.Millisecond)
				s.SetReadDeadline(began.Add(tc.second))
			}()
			_, err := s.Read(make([]byte, 8))
			if took := time.Since(began); !isTimeoutErr(err) || took < tc.second-10*time.Millisecond || took > 2*time.Second {
				t.Fatalf("read with its deadline moved from %v to %v: %v after %v, want a timeout at the second", tc.first, tc.second, err, took)
			}
		})
	}
	t.Run("eof", func(t *testing.T) {
		c, s, _ := followedPair(t)
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		go func() {
			time.Sleep(50 * time.Millisecond)
			c.Write([]byte("bye"))
			c.Close()
		}()
		all, err := io.ReadAll(s)
		if err != nil || string(all) != "bye" {
			t.Fatalf("read to the end: %q, %v", all, err)
		}
		for range 2 {
			if _, err := s.Read(make([]byte, 8)); err != io.EOF {
				t.Fatalf("read after the end: %v, want io.EOF at once", err)
			}
		}
	})
	t.Run("closed", func(t *testing.T) {
		_, s, _ := followedPair(t)
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		go func() {
			time.Sleep(50 * time.Millisecond)
			s.Close()
		}()
		if _, err := s.Read(make([]byte, 8)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read of a connection closed meanwhile: %v, want net.ErrClosed", err)
		}
	})
}

// Once the watch stops (Serve has returned), a waiting read, and every
// read after it, reads the socket directly.
func TestArrivalWatchStopped(t *testing.T) {
	c, s, w := followedPair(t)
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 8)
	done := make(chan error, 1)
	go func() {
		n, err := s.Read(b)
		if err == nil && string(b[:n]) != "after" {
			err = errors.New("read " + string(b[:n]))
		}
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	w.stop()
	time.Sleep(50 * time.Millisecond)
	c.Write([]byte("after"))
	if err := <-done; err != nil {
		t.Fatalf("read across the stop: %v", err)
	}
	c.Write([]byte("again"))
	if n, err := s.Read(b); err != nil || string(b[:n]) != "again" {
		t.Fatalf("read after the stop: %q, %v", b[:n], err)
	}
}

// A read that goes to the socket itself once the watch has stopped keeps
// the read deadline set through the watch, which the socket was not given.
func TestArrivalWatchStoppedKeepsTheDeadline(t *testing.T) {
	c, s, w := followedPair(t)
	w.stop()
	// Without the deadline the read would wait for ever: the peer's
	// close ends it, and the test fails rather than hangs.
	time.AfterFunc(3*time.Second, func() { c.Close() })
	began := time.Now()
	s.SetReadDeadline(began.Add(100 * time.Millisecond))
	_, err := s.Read(make([]byte, 8))
	if took := time.Since(began); !isTimeoutErr(err) || took > 2*time.Second {
		t.Fatalf("direct read after the watch stopped: %v after %v, want a timeout after 100ms", err, took)
	}
}

// Many connections waiting at once are each woken by their own data.
func TestArrivalWatchManyConnections(t *testing.T) {
	w, err := newArrivalWatch(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.stop)
	const conns = 50
	results := make(chan error, conns)
	clients := make([]*net.TCPConn, conns)
	for i := range conns {
		c, s := tcpPair(t)
		clients[i] = c
		tc := &trackedConn{watchedIO: watchedIO{Conn: s}, set: &connSet{}}
		tc.follow(w)
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		want := byte('A' + i%26)
		go func() {
			for range 20 {
				b := make([]byte, 4)
				n, err := tc.Read(b)
				if err != nil || n != 1 || b[0] != want {
					results <- errors.Join(err, errors.New("wrong data"))
					return
				}
				tc.Write(b[:1])
			}
			results <- nil
		}()
	}
	for i, c := range clients {
		go func() {
			b := make([]byte, 1)
			for range 20 {
				c.Write([]byte{byte('A' + i%26)})
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, b); err != nil {
					return
				}
			}
		}()
	}
	for range conns {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
}

// Closing a connection stops its deadline timer: a closed connection's
// state is not kept alive until a deadline minutes away.
func TestArrivalWatchedCloseStopsTheTimer(t *testing.T) {
	_, s, _ := followedPair(t)
	s.SetReadDeadline(time.Now().Add(time.Hour))
	done := make(chan error, 1)
	go func() {
		_, err := s.Read(make([]byte, 8))
		done <- err
	}()
	waitFor(t, 5*time.Second, "the read to wait with its timer set", func() bool {
		return s.watched.waiting.Load() && s.watched.timer.Load() != nil
	})
	s.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read of a connection closed meanwhile: %v, want net.ErrClosed", err)
	}
	if s.watched.timer.Load().Stop() { // true: it was still set
		t.Fatal("the deadline timer was still running after Close")
	}
}

// A client that sends two requests at once and half-closes is read to the
// end: both requests, then io.EOF, in pieces smaller than what arrived.
func TestArrivalWatchedPipelinedThenHalfClosed(t *testing.T) {
	c, s, _ := followedPair(t)
	const sent = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	go func() {
		time.Sleep(50 * time.Millisecond)
		c.Write([]byte(sent))
		c.CloseWrite()
	}()
	var got []byte
	b := make([]byte, 7)
	for {
		n, err := s.Read(b)
		got = append(got, b[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
	}
	if string(got) != sent {
		t.Fatalf("read %q, want %q", got, sent)
	}
}

// A watch that has stopped follows nothing more: its epoll descriptor is
// closed, and its number may already belong to another file.
func TestArrivalWatchFollowsNothingOnceStopped(t *testing.T) {
	w, err := newArrivalWatch(1)
	if err != nil {
		t.Fatal(err)
	}
	w.stop()
	// Most likely the closed descriptor's number again: a registration
	// through the stopped watch would land in this one.
	other, err := newArrivalWatch(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(other.stop)
	t.Logf("stopped watch's descriptor %d, the new one's %d", w.epfd, other.epfd)
	_, s := tcpPair(t)
	tc := &trackedConn{watchedIO: watchedIO{Conn: s}, set: &connSet{}}
	tc.follow(w)
	if tc.watched != nil {
		t.Fatal("a stopped watch followed a connection")
	}
	if c := followBackend(w, s); c != net.Conn(s) {
		t.Fatalf("a stopped watch wrapped a backend connection: %T", c)
	}
	if len(w.conns) != 0 {
		t.Fatalf("a stopped watch keeps %d connections", len(w.conns))
	}
}

// slowBodyBackend answers each request on a connection with a 200 whose header
// and body are written 20 ms apart, so that the proxy's read of the body
// waits for it; with closeAfter > 0 it then closes the connection after
// that long, without a Connection: close header, as a backend with a
// short keep-alive timeout does. It counts the connections it accepted.
func slowBodyBackend(t *testing.T, closeAfter time.Duration) (port int, conns *atomic.Int64) {
	return rawHTTPBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
			time.Sleep(20 * time.Millisecond)
			io.WriteString(c, "hello")
			if closeAfter > 0 {
				time.Sleep(closeAfter)
				return
			}
		}
	})
}

// While Serve runs, the arrival watch follows the connections to the
// backends as well as the clients': a response whose body comes later is
// read whole, on one backend connection kept alive, and a backend that
// closes its idle connection meanwhile costs the next request nothing
// (the watch has seen the end, so the read reports it at once and the
// request goes to a new connection). Once Serve returns, the watch is
// gone.
func TestArrivalWatchFollowsBackends(t *testing.T) {
	for _, tc := range []struct {
		name       string
		closeAfter time.Duration
		wantConns  int64
	}{
		{"kept alive", 0, 1},
		{"closed by the backend when idle", 50 * time.Millisecond, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port, conns := slowBodyBackend(t, tc.closeAfter)
			w := uint32(1)
			p := newProxy(t, testConfig([]config.Pool{{Name: "web", Algorithm: config.AlgorithmRoundRobin,
				Backends: []config.Backend{{Address: "127.0.0.1", Port: port, Weight: &w}}}}, config.Route{Pool: "web"}), Options{})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- p.Serve(ctx) }()
			var addr string
			waitFor(t, 5*time.Second, "listeners", func() bool { addr, _ = p.listenAddrs(); return addr != "" })
			watch := p.watch.Load()
			if watch == nil {
				t.Fatal("Serve runs without an arrival watch")
			}
			c := client()
			for i := range 3 {
				if i > 0 {
					time.Sleep(2 * tc.closeAfter)
				}
				r := get(t, c, "http://"+addr+"/")
				if r.status != http.StatusOK || r.body != "hello" {
					t.Fatalf("request %d: status %d, body %q", i, r.status, r.body)
				}
			}
			if got := conns.Load(); got != tc.wantConns {
				t.Errorf("the backend accepted %d connections, want %d", got, tc.wantConns)
			}
			// The client's keep-alive connection and the backend's.
			watch.mu.Lock()
			followed := len(watch.conns)
			watch.mu.Unlock()
			if tc.closeAfter == 0 && followed != 2 {
				t.Errorf("the watch follows %d connections, want 2 (the client's and the backend's)", followed)
			}
			c.CloseIdleConnections()
			cancel()
			if err := <-done; err != nil {
				t.Fatalf("Serve: %v", err)
			}
			if p.watch.Load() != nil || !watch.stopped.Load() {
				t.Error("the arrival watch outlived Serve")
			}
		})
	}
}
