package proxy

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The reads and writes that the arrival watch and the round's flusher
// make never wait: the socket is non-blocking, and they run only when
// there is something to read or room to write, or give up with EAGAIN.
// They are made as raw system calls, without telling the scheduler that
// the goroutine has entered one (syscall.Syscall's entersyscall and
// exitsyscall), a cost paid on every read and write of every request for
// a hand-off to another thread that a call this short never needs. And
// they are recvfrom(2) and sendto(2), as HAProxy makes them, rather than
// read(2) and write(2), which go through the file layer first (its
// checks and file-change notifications) to reach the same socket calls;
// MSG_NOSIGNAL spares the thread a SIGPIPE when the peer has gone.

// readNonblocking reads a non-blocking socket, retrying when
// interrupted.
func readNonblocking(fd uintptr, b []byte) (int, error) {
	return socketCall(unix.SYS_RECVFROM, fd, b, unix.MSG_DONTWAIT)
}

// writeNonblocking writes to a non-blocking socket, retrying when
// interrupted.
func writeNonblocking(fd uintptr, b []byte) (int, error) {
	return socketCall(unix.SYS_SENDTO, fd, b, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
}

// socketCall makes recvfrom(2) or sendto(2) (trap) on fd with b and
// flags, and no address, until it is not interrupted.
func socketCall(trap, fd uintptr, b []byte, flags int) (int, error) {
	for {
		n, _, errno := unix.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)),
			uintptr(flags), 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}
