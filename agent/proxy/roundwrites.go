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
				go d.writeBlocking(nil)
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
// goroutine serving the connection) writes; the flusher and Close write
// what is pending.
//
// Bytes reach the socket in one of two ways, never both at once: a write
// that cannot wait (the flusher's, Close's) is made under mu; a write
// that may wait (a large write, what a socket could not take, the writes
// of a connection closing or unbatched) is made by the one blocking
// writer, outside mu, while blocking is set. Pending bytes are added only
// while there is no blocking writer: a write made meanwhile waits for it,
// as it would wait for the socket.
type deferredWrites struct {
	flusher *writeFlusher
	conn    net.Conn // the socket itself
	raw     syscall.RawConn
	// notify wakes the connection's waiting read, to report a failed
	// deferred write.
	notify func()

	mu       sync.Mutex
	idle     sync.Cond // signalled when blocking is cleared
	pending  *[]byte   // nil: nothing pending
	queued   bool      // on the flusher's queue
	blocking bool      // a blocking writer is at work
	direct   bool      // closing, or unbatched: writes go out at once
	bypass   bool      // unbatched: writes go straight to the socket
	closeBy  bool      // the blocking writer closes the socket when done
	err      error     // a deferred write's failure
	failed   atomic.Bool
	nowOp    nonBlockingWrite // writeNow's, under mu

	// The write deadline set last (zero: none): a write made after it
	// fails at once, as on any connection. deadlineStale says the socket
	// does not have it yet: only a write that may wait in the socket
	// needs the socket's deadline, so it is handed over when such a
	// writer starts (or at once if one is at work), rather than arming
	// and disarming a runtime timer on every request for nothing.
	deadline      time.Time
	deadlineStale bool
}

// write sends b, or keeps it pending until the end of the round.
func (d *deferredWrites) write(b []byte) (int, error) {
	d.mu.Lock()
	if d.bypass {
		d.mu.Unlock()
		return d.conn.Write(b)
	}
	if d.err != nil {
		err := d.err
		d.mu.Unlock()
		return 0, err
	}
	held := 0
	if d.pending != nil {
		held = len(*d.pending)
	}
	if !d.direct && !d.blocking && held+len(b) <= writeDeferLimit && !d.pastDeadline() && !d.flusher.stopped() {
		if d.pending == nil {
			d.pending = pendingBufs.Get().(*[]byte)
		}
		*d.pending = append(*d.pending, b...)
		if !d.queued && !d.flusher.enqueue(d) {
			// The flusher stopped meanwhile: what is pending goes now.
			d.mu.Unlock()
			if err := d.writeBlocking(nil); err != nil {
				return 0, err
			}
			return len(b), nil
		}
		d.queued = true
		d.mu.Unlock()
		return len(b), nil
	}
	d.mu.Unlock()
	if err := d.writeBlocking(b); err != nil {
		return 0, err
	}
	return len(b), nil
}

// pastDeadline reports that the write deadline has passed. The caller
// holds mu. time.Since reads only the monotonic clock of a deadline that
// has one (deadlines are made from time.Now), where time.Now reads two
// clocks.
func (d *deferredWrites) pastDeadline() bool {
	return !d.deadline.IsZero() && time.Since(d.deadline) >= 0
}

// socketDeadlineLocked gives the socket the write deadline it has not
// been given yet, as a writer that may wait in it starts. The caller holds
// mu.
func (d *deferredWrites) socketDeadlineLocked() {
	if d.deadlineStale {
		d.deadlineStale = false
		d.conn.SetWriteDeadline(d.deadline) // fails only once closed, as the write will
	}
}

// writeBlocking writes what is pending, then b, waiting for the socket as
// a plain write does, as the connection's blocking writer.
func (d *deferredWrites) writeBlocking(b []byte) error {
	d.mu.Lock()
	for d.blocking {
		d.idle.Wait()
	}
	d.blocking = true
	d.socketDeadlineLocked()
	d.mu.Unlock()
	err := d.drainPending()
	if err == nil && len(b) > 0 {
		if _, werr := d.conn.Write(b); werr != nil {
			err = werr
		}
	}
	d.endBlocking()
	return err
}

// drainPending writes what is pending until nothing is, as the blocking
// writer.
func (d *deferredWrites) drainPending() error {
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

// endBlocking ends the blocking writer's turn, and closes the socket if
// the connection was closed meanwhile.
func (d *deferredWrites) endBlocking() {
	d.mu.Lock()
	d.blocking = false
	closeSocket := d.closeBy
	d.idle.Broadcast()
	d.mu.Unlock()
	if closeSocket {
		d.conn.Close()
	}
}

// take removes what is pending. The caller holds mu.
func (d *deferredWrites) take() *[]byte {
	p := d.pending
	d.pending = nil
	return p
}

// flushRound writes what is pending without waiting. What the socket
// cannot take now is written by a blocking writer of its own.
func (d *deferredWrites) flushRound() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queued = false
	// A blocking writer at work writes what is pending when done.
	if !d.blocking {
		d.flushNowLocked()
	}
}

// flushNowLocked writes what is pending without waiting, and leaves what
// the socket cannot take to a blocking writer of its own (payOwed). It
// reports whether it did. The caller holds mu, and there is no blocking
// writer.
func (d *deferredWrites) flushNowLocked() (owed bool) {
	p := d.take()
	if p == nil {
		return false
	}
	if d.err != nil {
		putPending(p)
		return false
	}
	written, err := d.writeNow(*p)
	switch {
	case err != nil:
		putPending(p)
		d.fail(err)
		return false
	case written == len(*p):
		putPending(p)
		return false
	}
	// The socket is full: the rest waits for it in a goroutine.
	*p = append((*p)[:0], (*p)[written:]...)
	d.pending = p
	d.blocking = true
	d.socketDeadlineLocked()
	go d.payOwed()
	return true
}

// writeNow writes b without waiting for the socket, and reports how much
// it took.
func (d *deferredWrites) writeNow(b []byte) (int, error) {
	op := &d.nowOp
	if op.call == nil {
		op.call = op.run
	}
	op.b, op.written, op.err = b, 0, nil
	cerr := d.raw.Write(op.call)
	written, werr := op.written, op.err
	op.b, op.err = nil, nil
	switch {
	case cerr != nil:
		return written, opError("write", d.conn, cerr)
	case werr != nil:
		return written, opError("write", d.conn, werr)
	}
	return written, nil
}

// nonBlockingWrite is writeNow's system call with its arguments and
// results. It lives in the connection, and its call is bound once,
// because a closure made per write would be allocated on the heap (it
// escapes into syscall.RawConn's interface) on every write of every
// connection. writeNow runs under mu, so one at a time.
type nonBlockingWrite struct {
	b       []byte
	written int
	err     error
	call    func(fd uintptr) bool // run, bound once
}

// run writes b until the socket is full (EAGAIN is no error: what is left
// waits for the blocking writer).
func (op *nonBlockingWrite) run(fd uintptr) bool {
	for op.written < len(op.b) {
		n, err := writeNonblocking(fd, op.b[op.written:])
		if err != nil {
			if err != unix.EAGAIN {
				op.err = os.NewSyscallError("write", err)
			}
			return true
		}
		op.written += n
	}
	return true
}

// payOwed is the blocking writer flushNowLocked starts: it writes what
// is owed (pending), then ends its turn.
func (d *deferredWrites) payOwed() {
	d.drainPending()
	d.endBlocking()
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

// setWriteDeadline sets the socket's write deadline, once what is pending
// has been handed to the socket under the deadline before: a write that
// has returned is not held to a deadline set after it (crypto/tls sets
// one of now after its closing alert, so that later writes fail). A
// blocking write at work is subject to it, as on any connection.
func (d *deferredWrites) setWriteDeadline(t time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.blocking && !d.bypass {
		d.flushNowLocked()
	}
	d.deadline = t
	if d.blocking || d.bypass {
		// A writer that may wait in the socket is at work, or writes
		// go straight to it.
		d.deadlineStale = false
		return d.conn.SetWriteDeadline(t)
	}
	d.deadlineStale = true
	return nil
}

// unbatch writes what is pending, and sends later writes straight to the
// socket: the connection half-closes, or becomes a tunnel whose two
// directions write from goroutines of their own.
func (d *deferredWrites) unbatch() error {
	d.mu.Lock()
	d.direct = true
	d.mu.Unlock()
	err := d.writeBlocking(nil)
	d.mu.Lock()
	d.bypass = true
	d.mu.Unlock()
	return err
}

// close ends the write side as the connection closes, and reports whether
// the socket's close is left to the blocking writer still at work (for
// at most ownedWriteLinger): bytes whose write has returned are sent
// before the socket closes, as the kernel sends a closed socket's unsent
// bytes. What is pending goes out first, as far as the socket takes it
// at once.
func (d *deferredWrites) close() (closeLater bool) {
	d.mu.Lock()
	d.direct = true
	if d.bypass {
		d.mu.Unlock()
		return false
	}
	if !d.blocking && !d.flushNowLocked() {
		d.mu.Unlock()
		return false
	}
	d.closeBy = true
	d.mu.Unlock()
	d.conn.SetWriteDeadline(time.Now().Add(ownedWriteLinger))
	return true
}

// writeAtOnce makes a connection's writes go out at once from then on,
// after what is pending: a tunnel and the HTTP/2 engine write from
// goroutines that do not wait for what they wrote to be answered, and
// gain nothing from waiting for the end of the round.
func writeAtOnce(c net.Conn) {
	switch v := c.(type) {
	case *trackedConn:
		if v.watched != nil {
			v.watched.writes.unbatch()
		}
	case *prefixConn:
		writeAtOnce(v.trackedConn)
	case *tlsClientConn:
		writeAtOnce(v.NetConn())
	case *tls.Conn:
		writeAtOnce(v.NetConn())
	case *backendConn:
		v.watched.writes.unbatch()
	}
}
