package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Why connections wait for data through an epoll instance of their own.
//
// A keep-alive connection that has just been answered reads again at
// once, for its next request, which has almost never arrived yet: Go's
// read tries the socket, fails with EAGAIN, and only then parks the
// goroutine in the runtime's poller. That failed read was one system call
// in five per proxied request, the one HAProxy does not make: its event
// loop reads a socket only once epoll has reported it readable.
//
// Go offers no wait without that read: every wait through the runtime's
// poller starts by forgetting the readiness it has already seen, so the
// read must come first, or a request that arrived since the last read
// (a pipelined one) would wait for data that came already.
//
// arrivalWatch keeps that memory instead. Every connection it follows is
// registered, edge-triggered, in one epoll instance, which Go's poller
// itself watches; one goroutine drains it and marks each connection that
// has received something (data, its end, an error) since its last read
// began. A read whose connection has no such mark waits for one, then
// reads once; a read that finds nothing after all (the mark came from
// bytes an earlier read took) waits again. Edge-triggered registration
// reports every arrival after the mark was cleared, so nothing that
// arrives is missed, and the draining goroutine's one epoll_wait serves
// every connection that became readable meanwhile.
//
// The connections to the backends read through the same watch
// (backendConn): not for a system call (the write of a request already
// waits for its reply without one, writeAwaitingReply), but for the order
// of the wake-ups, which the watch gives in the order epoll reported them.

// arrivalWatch is the epoll instance of the connections of one Serve, the
// clients' and the backends', and the goroutine that drains it.
type arrivalWatch struct {
	epfd int
	file *os.File // epfd, watched by Go's poller

	mu    sync.Mutex
	conns map[uint64]*arrival
	next  uint64

	stopped  atomic.Bool
	stopOnce sync.Once

	// flushers write the followed connections' pending bytes at the end
	// of each round (roundwrites.go), one per P.
	flushers []*writeFlusher
}

// arrival is what the watch knows of one connection.
type arrival struct {
	// seen is set when something has arrived since the connection's
	// last read began.
	seen atomic.Bool
	// ended is set once the client has closed its side, or the
	// connection has failed: from then on reads never wait, as the
	// end (after whatever data came with it) is reported only once.
	ended atomic.Bool
	// wake has a token after seen or ended was set, and whenever a
	// waiting read has more to check: its deadline moved or passed, the
	// connection was closed, the watch stopped.
	wake chan struct{}
}

// newArrivalWatch starts a watch, with flushers write flushers (at least
// one; Serve gives one per P). It fails only when the system has no epoll
// instance to give, or Go's poller cannot watch it.
func newArrivalWatch(flushers int) (*arrivalWatch, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	// Non-blocking, so that os.NewFile hands it to Go's poller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	w := &arrivalWatch{epfd: epfd, file: os.NewFile(uintptr(epfd), "arrival epoll"),
		conns: map[uint64]*arrival{}}
	rc, err := w.file.SyscallConn()
	if err != nil {
		w.file.Close()
		return nil, err
	}
	w.flushers = make([]*writeFlusher, max(flushers, 1))
	for i := range w.flushers {
		w.flushers[i] = newWriteFlusher()
		go w.flushers[i].run()
	}
	go w.run(rc)
	return w, nil
}

// run drains the epoll instance each time Go's poller finds it readable,
// until the watch stops. A poller that cannot watch it at all ends the
// watch at once, and the connections read as they would without it.
func (w *arrivalWatch) run(rc syscall.RawConn) {
	defer w.stop()
	events := make([]unix.EpollEvent, 256)
	rc.Read(func(uintptr) bool {
		for {
			n, err := unix.EpollWait(w.epfd, events, 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return true
			}
			w.mark(events[:n])
			if n < len(events) {
				return false // drained: wait for the next arrival
			}
		}
	})
}

func (w *arrivalWatch) mark(events []unix.EpollEvent) {
	if len(events) == 0 {
		return
	}
	w.mu.Lock()
	for i := range events {
		key := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
		if a := w.conns[key]; a != nil {
			if events[i].Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				a.ended.Store(true)
			}
			a.seen.Store(true)
			a.notify()
		}
	}
	w.mu.Unlock()
}

func (a *arrival) notify() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// stop ends the watch. Connections waiting on it go back to reading the
// socket themselves.
func (w *arrivalWatch) stop() {
	w.stopOnce.Do(func() {
		w.stopped.Store(true)
		w.mu.Lock()
		for _, a := range w.conns {
			a.notify()
		}
		w.mu.Unlock()
		// Closed outside the lock: Close waits for the draining
		// goroutine, which may be waiting for the lock to mark. A
		// follow that took the lock first has registered by now, and
		// any later one sees stopped.
		w.file.Close()
		for _, f := range w.flushers {
			close(f.done)
		}
	})
}

// follow registers a connection's socket and returns its arrival state,
// marked: what arrived before the registration is read first. The
// registration is made under the lock that stop takes (after setting
// stopped) before it closes the epoll instance: a connection accepted or
// dialed as Serve returns must not be registered with a descriptor number
// the system may have given to another file since.
func (w *arrivalWatch) follow(fd int) (*arrival, uint64, error) {
	a := &arrival{wake: make(chan struct{}, 1)}
	a.seen.Store(true)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped.Load() {
		return nil, 0, errWatchStopped
	}
	w.next++
	key := w.next
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(uint32(key)), Pad: int32(uint32(key >> 32))}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, 0, os.NewSyscallError("epoll_ctl", err)
	}
	w.conns[key] = a
	return a, key, nil
}

// forget drops a connection. Its socket leaves the epoll instance when it
// is closed.
func (w *arrivalWatch) forget(key uint64) {
	w.mu.Lock()
	delete(w.conns, key)
	w.mu.Unlock()
}

// watchedConn is the part of a connection that reads through an
// arrivalWatch, and writes through its flushers.
type watchedConn struct {
	watch   *arrivalWatch
	arrival *arrival
	key     uint64
	raw     syscall.RawConn
	writes  deferredWrites

	readOp       rawRead      // readOnce's system call
	readDeadline atomic.Int64 // unix nanoseconds; 0: none
	waiting      atomic.Bool  // a read waits for an arrival
	closed       atomic.Bool

	// A timer that wakes a wait at the read deadline (stopped by close,
	// so that a closed connection's state is not kept until then), and
	// when it is set to fire (unix nanoseconds; 0: not pending).
	//
	// A keep-alive connection's deadline moves later with every request
	// (fasthttp sets it twice per request), so the timer is not moved
	// with it: one pending at or before the deadline is left to fire,
	// and the wait it wakes sets it again for what is left. It is moved
	// only when the deadline comes earlier than it would fire. The
	// socket's own read deadline is not kept either (reads through the
	// watch never wait in the socket), except for reads that go to the
	// socket directly (readDirect).
	timer atomic.Pointer[time.Timer]
	armed atomic.Int64
}

// errWatchStopped is what a wait returns once the watch has stopped.
var errWatchStopped = errors.New("proxy: arrival watch stopped")

// followConn puts c's reads and writes under w, or returns nil when c is
// no socket or w cannot register it (c is then used as it would be
// without a watch).
func (w *arrivalWatch) followConn(c net.Conn) *watchedConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var a *arrival
	var key uint64
	cerr := raw.Control(func(fd uintptr) { a, key, err = w.follow(int(fd)) })
	if cerr != nil || err != nil {
		return nil
	}
	r := &watchedConn{watch: w, arrival: a, key: key, raw: raw}
	r.writes = deferredWrites{flusher: w.flushers[key%uint64(len(w.flushers))], conn: c, raw: raw, notify: a.notify}
	r.writes.idle.L = &r.writes.mu
	return r
}

// follow puts c's reads and writes under w.
func (c *trackedConn) follow(w *arrivalWatch) { c.watched = w.followConn(c.Conn) }

// connRead reads conn, whose reads r follows (nil: none), as
// net.Conn.Read does.
func (r *watchedConn) connRead(conn net.Conn, b []byte) (int, error) {
	if r == nil || len(b) == 0 {
		return conn.Read(b)
	}
	n, err, fallback := r.read(conn, b)
	if fallback {
		return r.readDirect(conn, b)
	}
	return n, err
}

// connWrite writes to conn, whose writes r follows (nil: none), as
// net.Conn.Write does, except that a small write may be sent at the end of
// the round (roundwrites.go).
func (r *watchedConn) connWrite(conn net.Conn, b []byte) (int, error) {
	if r == nil {
		return conn.Write(b)
	}
	return r.writes.write(b)
}

// connSetReadDeadline sets conn's read deadline: for the watched reads
// only when r follows it, since setting the socket's too would cost a
// runtime timer update per call (twice per request on a client
// connection) for reads that never wait in it.
func (r *watchedConn) connSetReadDeadline(conn net.Conn, t time.Time) error {
	if r == nil {
		return conn.SetReadDeadline(t)
	}
	if r.closed.Load() {
		return opError("set", conn, net.ErrClosed)
	}
	r.setReadDeadline(t)
	return nil
}

// connSetWriteDeadline sets conn's write deadline, after what r holds
// pending is written.
func (r *watchedConn) connSetWriteDeadline(conn net.Conn, t time.Time) error {
	if r == nil {
		return conn.SetWriteDeadline(t)
	}
	if r.closed.Load() {
		return opError("set", conn, net.ErrClosed)
	}
	return r.writes.setWriteDeadline(t)
}

// connSetDeadline is connSetReadDeadline and connSetWriteDeadline.
func (r *watchedConn) connSetDeadline(conn net.Conn, t time.Time) error {
	if r == nil {
		return conn.SetDeadline(t)
	}
	if r.closed.Load() {
		return opError("set", conn, net.ErrClosed)
	}
	err := r.writes.setWriteDeadline(t)
	r.setReadDeadline(t)
	return err
}

// read reads from a followed connection: at once when something has
// arrived since the last read began, otherwise once something does.
// fallback reports that the caller must read the socket itself: the watch
// has stopped (and it will from then on), or cannot tell more.
func (r *watchedConn) read(c net.Conn, b []byte) (n int, err error, fallback bool) {
	a := r.arrival
	for {
		if err := r.writes.writeError(); err != nil {
			return 0, err, false
		}
		if !a.seen.Load() && !a.ended.Load() {
			if err := r.await(c); err != nil {
				return 0, err, err == errWatchStopped
			}
		}
		a.seen.Store(false)
		var again bool
		n, err, again = r.readOnce(c, b)
		if again && a.ended.Load() {
			// Nothing to read after an end was reported: not
			// expected of a TCP socket, and no arrival will say
			// more; Go's poller waits instead.
			return 0, nil, true
		}
		if !again {
			// A full buffer may have left bytes in the socket, and an
			// end or an error is read again at once, as from the
			// socket: neither will be reported again.
			if n == len(b) || err != nil {
				a.seen.Store(true)
			}
			return n, err, false
		}
	}
}

// readOnce reads the socket without waiting. again reports that it had
// nothing.
func (r *watchedConn) readOnce(c net.Conn, b []byte) (n int, err error, again bool) {
	var rerr, cerr error
	if op := &r.readOp; op.busy.CompareAndSwap(false, true) {
		if op.call == nil {
			op.call = op.run
		}
		op.b, op.n, op.err = b, 0, nil
		cerr = r.raw.Read(op.call)
		n, rerr = op.n, op.err
		op.b, op.err = nil, nil
		op.busy.Store(false)
	} else {
		// Another read of the same connection is under way (net.Conn
		// allows it; nothing here does it): it has the op.
		n, rerr, cerr = r.readConcurrent(b)
	}
	switch {
	case cerr != nil:
		return 0, readError(c, cerr), false
	case rerr == unix.EAGAIN:
		return 0, nil, true
	case rerr != nil:
		return 0, readError(c, os.NewSyscallError("read", rerr)), false
	case n == 0:
		return 0, io.EOF, false
	}
	return n, nil, false
}

// readConcurrent is readOnce's system call for a read that runs while
// another has the connection's rawRead.
func (r *watchedConn) readConcurrent(b []byte) (n int, rerr, cerr error) {
	cerr = r.raw.Read(func(fd uintptr) bool {
		n, rerr = readNonblocking(fd, b)
		return true
	})
	return n, rerr, cerr
}

// rawRead is readOnce's system call with its argument and results. It
// lives in the connection, and its call is bound once, because a closure
// made per read would be allocated on the heap (it escapes into
// syscall.RawConn's interface) on every read of every connection. busy
// gives it to one read at a time.
type rawRead struct {
	busy atomic.Bool
	b    []byte
	n    int
	err  error
	call func(fd uintptr) bool // run, bound once
}

func (op *rawRead) run(fd uintptr) bool {
	op.n, op.err = readNonblocking(fd, op.b)
	return true
}

// await waits until something has arrived, under the read deadline (which
// may move meanwhile), until the connection is closed, or until the watch
// stops. The wait is one channel receive: everything that may end it
// leaves a token there.
func (r *watchedConn) await(c net.Conn) error {
	a := r.arrival
	for !a.seen.Load() && !a.ended.Load() {
		// Waiting is announced before the deadline is read, so that a
		// deadline set meanwhile either is read here or wakes the wait.
		r.waiting.Store(true)
		switch {
		case r.closed.Load():
			r.waiting.Store(false)
			return readError(c, net.ErrClosed)
		case r.watch.stopped.Load():
			r.waiting.Store(false)
			return errWatchStopped
		case r.writes.failed.Load():
			r.waiting.Store(false)
			return r.writes.writeError()
		}
		if dl := r.readDeadline.Load(); dl != 0 {
			if armed := r.armed.Load(); armed == 0 || armed > dl {
				d := time.Until(time.Unix(0, dl))
				if d <= 0 {
					r.waiting.Store(false)
					return readError(c, os.ErrDeadlineExceeded)
				}
				// Recorded before the timer is set, so that its
				// firing (which clears it) always comes after.
				r.armed.Store(dl)
				if t := r.timer.Load(); t != nil {
					t.Reset(d)
				} else {
					r.timer.Store(time.AfterFunc(d, r.expire))
				}
				if r.closed.Load() {
					// Closed while the timer was set: close may
					// have stopped it before.
					r.timer.Load().Stop()
					continue
				}
			}
			// Otherwise the pending timer fires at or before the
			// deadline, and this loop looks again then.
		}
		if !a.seen.Load() && !a.ended.Load() {
			<-a.wake
		}
		r.waiting.Store(false)
	}
	return nil
}

// expire is the timer's: it is no longer pending, and a waiting read
// looks at its deadline.
func (r *watchedConn) expire() {
	r.armed.Store(0)
	r.arrival.notify()
}

// deadline is the recorded read deadline.
func (r *watchedConn) deadline() time.Time {
	if ns := r.readDeadline.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// readDirect reads the socket itself, under the recorded read deadline,
// for a read the watch cannot serve (watchedConn.read's fallback).
func (r *watchedConn) readDirect(c net.Conn, b []byte) (int, error) {
	if err := c.SetReadDeadline(r.deadline()); err != nil {
		return 0, err
	}
	return c.Read(b)
}

// setReadDeadline records the read deadline, and wakes a waiting read to
// apply it.
func (r *watchedConn) setReadDeadline(t time.Time) {
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	r.readDeadline.Store(ns)
	if r.waiting.Load() {
		r.arrival.notify()
	}
}

// close sends what is pending, and makes the connection's reads and writes
// go to the socket from then on. closeLater reports that the socket is
// closed by the goroutine still writing what the socket could not take
// (deferredWrites.close), not by the caller.
func (r *watchedConn) close() (closeLater bool) {
	closeLater = r.writes.close()
	r.closed.Store(true)
	if t := r.timer.Load(); t != nil {
		t.Stop()
	}
	r.arrival.notify()
	r.watch.forget(r.key)
	return closeLater
}

func readError(c net.Conn, err error) error { return opError("read", c, err) }

// opError is a failed operation on a TCP connection, as net.Conn's own
// methods report it.
func opError(op string, c net.Conn, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// watchedIO is a connection whose reads, writes and deadlines go through
// an arrival watch (watched; nil: straight to the socket). Client and
// backend connections embed it.
type watchedIO struct {
	net.Conn
	watched *watchedConn
}

func (c *watchedIO) Read(b []byte) (int, error) { return c.watched.connRead(c.Conn, b) }

func (c *watchedIO) Write(b []byte) (int, error) { return c.watched.connWrite(c.Conn, b) }

func (c *watchedIO) SetReadDeadline(t time.Time) error {
	return c.watched.connSetReadDeadline(c.Conn, t)
}

func (c *watchedIO) SetWriteDeadline(t time.Time) error {
	return c.watched.connSetWriteDeadline(c.Conn, t)
}

func (c *watchedIO) SetDeadline(t time.Time) error { return c.watched.connSetDeadline(c.Conn, t) }

// backendConn is a connection to a backend whose reads wait through the
// arrival watch, as client connections' do. The proxy writes a request
// and reads its response, which arrives later. Go's poller runs the
// goroutines one poll woke in the reverse of the order epoll reported
// them (each is pushed onto a list that is run head first); on a
// saturated core, the backend responses that came first in a poll then
// waited longest, and p99 stretched to 2.5-3x p50, where HAProxy's
// event loop, which works in epoll's order, stays near 2x. The watch
// wakes them in epoll's order (docs/BENCHMARKS.md).
type backendConn struct{ watchedIO }

// followBackend puts a new backend connection's reads and writes under w
// (nil: no watch), or returns it as it is when w cannot follow it.
func followBackend(w *arrivalWatch, c net.Conn) net.Conn {
	if w == nil {
		return c
	}
	r := w.followConn(c)
	if r == nil {
		return c
	}
	return &backendConn{watchedIO{Conn: c, watched: r}}
}

// followBackend is the host clients' hook for each connection they dial:
// the running Serve's arrival watch follows it.
func (p *Proxy) followBackend(c net.Conn) net.Conn { return followBackend(p.watch.Load(), c) }

func (c *backendConn) Close() error {
	if c.watched.close() {
		return nil
	}
	return c.Conn.Close()
}

// SyscallConn gives the socket, for the checks that peek at it.
func (c *backendConn) SyscallConn() (syscall.RawConn, error) { return c.watched.raw, nil }
