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
// a hand-off to another thread that a call this short never needs.

// readNonblocking is read(2) on a non-blocking descriptor, retried when
// interrupted.
func readNonblocking(fd uintptr, b []byte) (int, error) {
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// writeNonblocking is write(2) on a non-blocking descriptor, retried when
// interrupted.
func writeNonblocking(fd uintptr, b []byte) (int, error) {
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}
