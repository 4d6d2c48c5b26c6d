package proxy

import (
	"crypto/tls"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Why the writes of followed connections wait for the end of the round.
//
// On loopback, and wherever a peer sleeps in epoll, a write's cost is
// mostly the peer's wake-up: the write that finds the peer asleep wakes
// it (an inter-processor interrupt when it sleeps on another core), while
// one that comes as the peer is still busy with earlier ones only queues.
// HAProxy's event loop writes in bursts: it reads everything epoll
// reported, then processes, then writes it all, so its peers wake about
// once per burst. A goroutine per connection writes as soon as its own
// request is ready, between the reads and the parsing of the others, a
// trickle that lets a quicker peer sleep between two writes: in
// BenchmarkL7, wrk slept 0.06-0.24 times per request behind VeloFlux and
// 0.02-0.03 times behind HAProxy, and those wake-ups made VeloFlux's CPU
// per request run from 37 to 62 µs from one run to the next
// (docs/BENCHMARKS.md).
//
// So a followed connection's write (a response to a client, a request to
// a backend) is copied into the connection's pending bytes, and a flusher
// goroutine writes them once the goroutines that were ready to run have
// run: it yields first (runtime.Gosched puts it behind them, and Go polls
// the network only once they are done), then writes every connection's
// pending bytes in one burst, without waiting on any of them. A write the
// socket cannot take whole is finished by a goroutine of its own, so a
// slow client holds no other connection back. Large writes (a body being
// streamed) do not wait: a connection's pending bytes, then the write
// itself, go out at once from the writer's goroutine, in order.
//
// A deferred write that fails is reported by the connection's next
// write, and its next read: the read of a backend's answer to a request
// that could not be sent fails as the write would have.

// writeDeferLimit is the most a connection keeps pending; a write that
// would take it over goes out at once, after what is pending.
const writeDeferLimit = 16 << 10

// pendingBufs holds the buffers of pending bytes between two rounds, so
// that an idle connection keeps none.
var pendingBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// writeFlusher writes, once per round, the pending bytes of the
// connections queued on it. A watch has one per P (GOMAXPROCS when it
// started), so that writing is spread over the cores as the writers are.
type writeFlusher struct {
	mu     sync.Mutex
	queue  []*deferredWrites
	kick   chan struct{}
	done   chan struct{}
	closed atomic.Bool // done was seen: nothing is queued any more
}

func newWriteFlusher() *writeFlusher {
	return &writeFlusher{kick: make(chan struct{}, 1), done: make(chan struct{})}
}

// run flushes each round's queue until done is closed, then hands what is
// still queued to goroutines of its own.
func (f *writeFlusher) run() {
	var round []*deferredWrites
	for {
		select {
		case <-f.kick:
		case <-f.done:
			f.mu.Lock()
			f.closed.Store(true)
			round, f.queue = f.queue, nil
			f.mu.Unlock()
			for _, d := range round {
				go d.drain()
			}
			return
		}
		// Behind the goroutines that are ready to run: their writes
		// join this round's.
		runtime.Gosched()
		f.mu.Lock()
		round, f.queue = f.queue, round[:0]
		f.mu.Unlock()
		for _, d := range round {
			d.flushRound()
		}
		clear(round) // keeps no closed connection reachable
	}
}

// stopped reports that the flusher takes no more connections.
func (f *writeFlusher) stopped() bool { return f.closed.Load() }

// enqueue queues d for the end of the round, or reports that the flusher
// has stopped.
func (f *writeFlusher) enqueue(d *deferredWrites) bool {
	f.mu.Lock()
	if f.closed.Load() {
		f.mu.Unlock()
		return false
	}
	f.queue = append(f.queue, d)
	first := len(f.queue) == 1
	f.mu.Unlock()
	if first {
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
	return true
}

// ownedWriteLinger bounds how long bytes whose write has returned are
// still sent after the connection is closed, when the socket could not
// take them at once (a client that reads slowly): the kernel keeps a
// closed socket's unsent bytes the same way.
const ownedWriteLinger = 10 * time.Second

// deferredWrites is a followed connection's write side. Its owner (the
// goroutine serving the connection) writes; the flusher, the goroutines
// it starts and Close may write what is pending.
//
// mu guards the state and is never held across a system call that may
// wait; wmu orders the writes to the socket and is held across them.
type deferredWrites struct {
	flusher *writeFlusher
	conn    net.Conn // the socket itself
	raw     syscall.RawConn
	// notify wakes the connection's waiting read, to report a failed
	// deferred write.
	notify func()

	wmu sync.Mutex

	mu      sync.Mutex
	pending *[]byte // nil: nothing pending
	queued  bool    // on the flusher's queue
	owing   bool    // a goroutine writes what the socket could not take
	direct  bool    // closing, or handed to a tunnel: writes go out at once
	closeBy bool    // the owing goroutine closes the socket when done
	err     error   // a deferred write's failure
	failed  atomic.Bool

	// The socket's write deadline (unix nanoseconds; 0: none): a write
	// made after it fails at once, as on any connection.
	writeDeadline atomic.Int64
}

// write sends b, or keeps it pending until the end of the round.
func (d *deferredWrites) write(b []byte) (int, error) {
	d.mu.Lock()
	if d.err != nil {
		err := d.err
		d.mu.Unlock()
		return 0, err
	}
	held := 0
	if d.pending != nil {
		held = len(*d.pending)
	}
	if !d.direct && !d.owing && held+len(b) <= writeDeferLimit && !d.flusher.stopped() && !d.pastDeadline() {
		if d.pending == nil {
			d.pending = pendingBufs.Get().(*[]byte)
		}
		*d.pending = append(*d.pending, b...)
		queued := d.queued || d.flusher.enqueue(d)
		d.queued = queued
		d.mu.Unlock()
		if !queued {
			// The flusher stopped meanwhile.
			d.drain()
		}
		return len(b), nil
	}
	d.mu.Unlock()
	// At once, after what is pending or owed: as a plain write, this
	// waits as long as the socket (and its write deadline) make it.
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if err := d.drainLocked(); err != nil {
		return 0, err
	}
	return d.conn.Write(b)
}

func (d *deferredWrites) pastDeadline() bool {
	dl := d.writeDeadline.Load()
	return dl != 0 && time.Now().UnixNano() >= dl
}

// take removes what is pending. The caller holds mu.
func (d *deferredWrites) take() *[]byte {
	p := d.pending
	d.pending = nil
	return p
}

// drainLocked writes what is pending until nothing is, waiting as long as
// the socket makes it. The caller holds wmu.
func (d *deferredWrites) drainLocked() error {
	for {
		d.mu.Lock()
		p, err := d.take(), d.err
		d.mu.Unlock()
		if p == nil || err != nil {
			putPending(p)
			return err
		}
		_, werr := d.conn.Write(*p)
		putPending(p)
		if werr != nil {
			d.mu.Lock()
			d.fail(werr)
			d.mu.Unlock()
			return werr
		}
	}
}

// flushRound writes what is pending without waiting. What the socket
// cannot take now is written by a goroutine of its own (owe), as is what
// a writer holding the socket leaves.
func (d *deferredWrites) flushRound() {
	if !d.wmu.TryLock() {
		d.mu.Lock()
		d.queued = false
		d.mu.Unlock()
		go d.drain()
		return
	}
	d.mu.Lock()
	d.queued = false
	p := d.take()
	failed := d.err != nil
	d.mu.Unlock()
	if p == nil || failed {
		putPending(p)
		d.wmu.Unlock()
		return
	}
	written, err := d.writeNow(*p)
	if err != nil {
		putPending(p)
		d.mu.Lock()
		d.fail(err)
		d.mu.Unlock()
		d.wmu.Unlock()
		return
	}
	if written == len(*p) {
		putPending(p)
		d.wmu.Unlock()
		return
	}
	d.owe(p, written)
}

// writeNow writes b without waiting for the socket, and reports how much
// it took.
func (d *deferredWrites) writeNow(b []byte) (int, error) {
	written := 0
	var werr error
	cerr := d.raw.Write(func(fd uintptr) bool {
		for written < len(b) {
			n, err := unix.Write(int(fd), b[written:])
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if err != unix.EAGAIN {
					werr = os.NewSyscallError("write", err)
				}
				return true
			}
			written += n
		}
		return true
	})
	switch {
	case cerr != nil:
		return written, opError("write", d.conn, cerr)
	case werr != nil:
		return written, opError("write", d.conn, werr)
	}
	return written, nil
}

// owe puts what p still holds after written bytes back in front of what
// was made pending since, and has a goroutine write it. The caller holds
// wmu, which passes to that goroutine.
func (d *deferredWrites) owe(p *[]byte, written int) {
	d.mu.Lock()
	rest := append((*p)[:0], (*p)[written:]...)
	if d.pending != nil {
		rest = append(rest, *d.pending...)
		putPending(d.pending)
	}
	*p = rest
	d.pending = p
	d.owing = true
	d.mu.Unlock()
	go d.payOwed()
}

// payOwed writes what is owed, then closes the socket if the connection
// was closed meanwhile. It holds wmu, from owe.
func (d *deferredWrites) payOwed() {
	d.drainLocked()
	d.mu.Lock()
	d.owing = false
	closeSocket := d.closeBy
	d.mu.Unlock()
	d.wmu.Unlock()
	if closeSocket {
		d.conn.Close()
	}
}

// drain writes what is pending once the socket's writer is done.
func (d *deferredWrites) drain() {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	d.drainLocked()
}

// fail records a deferred write's failure and tells the reads. The caller
// holds mu.
func (d *deferredWrites) fail(err error) {
	if d.err == nil {
		d.err = err
	}
	d.failed.Store(true)
	d.notify()
}

// putPending gives a pending buffer back.
func putPending(p *[]byte) {
	if p != nil && cap(*p) <= writeDeferLimit {
		*p = (*p)[:0]
		pendingBufs.Put(p)
	}
}

// writeError is the failure of a deferred write, for a read to report.
func (d *deferredWrites) writeError() error {
	if !d.failed.Load() {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// setWriteDeadline sets the socket's write deadline once what is pending
// is written, under the deadline before: a write that has returned is not
// held to a deadline set after it (crypto/tls sets one of now after its
// closing alert, so that later writes fail). A write in progress is
// subject to it, as on any connection.
func (d *deferredWrites) setWriteDeadline(t time.Time) error {
	if d.wmu.TryLock() {
		d.drainLocked() // a failure is the next write's and read's to report
		d.wmu.Unlock()
	}
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	d.writeDeadline.Store(ns)
	return d.conn.SetWriteDeadline(t)
}

// unbatch writes what is pending, and makes later writes go out at once:
// the connection half-closes, or becomes a tunnel whose two directions
// write from goroutines of their own.
func (d *deferredWrites) unbatch() error {
	d.mu.Lock()
	d.direct = true
	d.mu.Unlock()
	d.wmu.Lock()
	defer d.wmu.Unlock()
	return d.drainLocked()
}

// close ends the write side as the connection closes, and reports whether
// the socket's close is left to the goroutine still writing what was owed
// (for at most ownedWriteLinger). What is pending is written first, as far
// as the socket takes it at once; a write in progress is ended by the
// close, as on any connection.
func (d *deferredWrites) close() (closeLater bool) {
	d.mu.Lock()
	d.direct = true
	if d.owing {
		d.closeBy = true
		d.mu.Unlock()
		d.conn.SetWriteDeadline(time.Now().Add(ownedWriteLinger))
		return true
	}
	d.mu.Unlock()
	if !d.wmu.TryLock() {
		return false
	}
	d.mu.Lock()
	p := d.take()
	failed := d.err != nil
	d.mu.Unlock()
	if p == nil || failed {
		putPending(p)
		d.wmu.Unlock()
		return false
	}
	written, err := d.writeNow(*p)
	if err != nil || written == len(*p) {
		putPending(p)
		d.wmu.Unlock()
		return false
	}
	d.mu.Lock()
	d.closeBy = true
	d.mu.Unlock()
	d.conn.SetWriteDeadline(time.Now().Add(ownedWriteLinger))
	d.owe(p, written)
	return true
}

// writeAtOnce makes a connection's writes go out at once from then on,
// after what is pending: a tunnel and the HTTP/2 engine write from
// goroutines that do not wait for what they wrote to be answered, and
// gain nothing from waiting for the end of the round.
func writeAtOnce(c net.Conn) {
	switch v := c.(type) {
	case *trackedConn:
		if v.reads != nil {
			v.reads.writes.unbatch()
		}
	case *prefixConn:
		writeAtOnce(v.trackedConn)
	case *tlsClientConn:
		writeAtOnce(v.NetConn())
	case *tls.Conn:
		writeAtOnce(v.NetConn())
	case *backendConn:
		v.reads.writes.unbatch()
	}
}
