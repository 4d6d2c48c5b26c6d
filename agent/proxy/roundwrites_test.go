package proxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// readAll reads from c until EOF or an error, under a deadline, in a
// goroutine of its own.
func readAll(c net.Conn, d time.Duration) <-chan []byte {
	got := make(chan []byte, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(d))
		b, _ := io.ReadAll(c)
		got <- b
	}()
	return got
}

// Small writes (sent at the end of the round) and large ones (sent at
// once, after what is pending) reach the peer whole and in the order they
// were made, and Close sends what is still pending before the FIN.
func TestRoundWritesKeepTheirOrder(t *testing.T) {
	client, server, _ := followedPair(t)
	got := readAll(client, 10*time.Second)
	var want []byte
	for i, n := range []int{10, 3 * writeDeferLimit / 2, 5, 100, writeDeferLimit - 50, 200, 3} {
		b := bytes.Repeat([]byte{byte('a' + i)}, n)
		want = append(want, b...)
		if m, err := server.Write(b); err != nil || m != n {
			t.Fatalf("write %d of %d bytes: %d, %v", i, n, m, err)
		}
	}
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("the peer read %d bytes, want the %d written, in order", len(b), len(want))
	}
}

// fillUntilOwed writes to a connection whose peer reads nothing until a
// write could not be taken whole at the end of its round, and returns
// what it wrote.
func fillUntilOwed(t *testing.T, c *trackedConn) []byte {
	t.Helper()
	var sent []byte
	chunk := make([]byte, 4<<10)
	for i := 0; ; i++ {
		if i == 1<<16 {
			t.Fatal("the socket never filled")
		}
		for j := range chunk {
			chunk[j] = byte(i + j)
		}
		if _, err := c.Write(chunk); err != nil {
			t.Fatal(err)
		}
		sent = append(sent, chunk...)
		// Let the flusher run the round.
		time.Sleep(time.Millisecond)
		d := &c.watched.writes
		d.mu.Lock()
		owing := d.blocking
		d.mu.Unlock()
		if owing {
			return sent
		}
	}
}

// A connection whose peer stops reading holds no other connection's writes
// back: what its socket cannot take is written by a goroutine of its own,
// and the flusher they share goes on.
func TestRoundWritesStalledPeerHoldsNoOneBack(t *testing.T) {
	w, err := newArrivalWatch(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.stop)
	stalledClient, stalled := followedPairOn(t, w)
	otherClient, other := followedPairOn(t, w)
	sent := fillUntilOwed(t, stalled)

	if _, err := other.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	otherClient.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 4)
	if _, err := io.ReadFull(otherClient, b); err != nil || string(b) != "ping" {
		t.Fatalf("the other connection's write: %q, %v", b, err)
	}

	// The stalled peer reads at last, and gets everything, in order.
	got := readAll(stalledClient, 10*time.Second)
	if err := stalled.Close(); err != nil {
		t.Fatal(err)
	}
	if r := <-got; !bytes.Equal(r, sent) {
		t.Fatalf("the stalled peer read %d bytes, want the %d written, in order", len(r), len(sent))
	}
}

// Close returns at once even when bytes whose write returned are still
// owed to a peer that reads slowly; the socket closes once the peer has
// them.
func TestRoundWritesCloseLeavesOwedBytesToTheirWriter(t *testing.T) {
	client, server, _ := followedPair(t)
	sent := fillUntilOwed(t, server)
	closed := make(chan error, 1)
	go func() { closed <- server.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for the peer to read")
	}
	if r := <-readAll(client, 10*time.Second); !bytes.Equal(r, sent) {
		t.Fatalf("the peer read %d bytes then the end, want the %d written", len(r), len(sent))
	}
}

// A write deadline set after a write has returned does not cut it short:
// crypto/tls sets one of now once its closing alert is written.
func TestRoundWritesLaterDeadlineSparesEarlierWrites(t *testing.T) {
	client, server, _ := followedPair(t)
	got := readAll(client, 10*time.Second)
	if _, err := server.Write([]byte("answer")); err != nil {
		t.Fatal(err)
	}
	if err := server.SetWriteDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Write([]byte("late")); !isTimeoutErr(err) {
		t.Errorf("a write past the deadline: %v, want a timeout", err)
	}
	server.Close()
	if b := <-got; string(b) != "answer" {
		t.Fatalf("the peer read %q, want %q", b, "answer")
	}
}

// A deferred write that fails (the peer has reset the connection) is
// reported by a later write and by the next read, which does not wait.
func TestRoundWritesFailureIsReported(t *testing.T) {
	client, server, _ := followedPair(t)
	client.SetLinger(0)
	client.Close()
	server.SetReadDeadline(time.Now().Add(10 * time.Second))
	var writeErr error
	for i := 0; i < 200 && writeErr == nil; i++ {
		_, writeErr = server.Write([]byte("x"))
		time.Sleep(10 * time.Millisecond)
	}
	if writeErr == nil {
		t.Fatal("writes to a reset connection kept succeeding")
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 1))
		readErr <- err
	}()
	select {
	case err := <-readErr:
		if err == nil || isTimeoutErr(err) {
			t.Fatalf("the read after a failed write: %v, want the failure", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the read after a failed write waited")
	}
}
