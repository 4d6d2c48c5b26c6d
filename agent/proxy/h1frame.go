package proxy

import (
	"bytes"
	"strconv"
)

// h1Framing follows the framing of the HTTP/1 requests on a connection, as
// net/http reads them: each request's header block, then its body, chunked
// when Transfer-Encoding is present (on HTTP/1.1) and otherwise of
// Content-Length bytes, the precedence net/http applies. Knowing where each
// header block is lets it refuse a request whose header block has both
// Content-Length and Transfer-Encoding.
//
// Such a request is how requests are smuggled past a front proxy that
// frames by Content-Length: net/http frames it by Transfer-Encoding, drops
// the Content-Length, and keeps the connection open, so that what the
// front proxy took for this request's body is read as the next request.
// RFC 9112 §6.3 lets a server reject it, or process it as chunked and then
// close the connection; the proxy rejects it, as nginx does. It does so by
// replacing the first byte of the blank line that ends the header block
// with a NUL before net/http reads it: net/http then finds a malformed
// header line (a NUL is never valid in a field name), answers "400 Bad
// Request" with "Connection: close" and closes the connection, so the
// request never reaches a handler and nothing after it is read as a
// request. (Failing the read instead would also cancel the request before
// it on a pipelining connection, whose background read would meet the
// error.)
//
// It stops following only where the connection is about to close anyway:
// at a request net/http rejects with an error and closes on (a header block
// over its limit, a request line or header line it cannot parse, a bad or
// conflicting Content-Length), and at a chunk size that does not parse,
// whose body read fails, after which the connection is closed too.
type h1Framing struct {
	state     h1State
	line      []byte // the current line, without its end
	lineStart int    // where the current line began in the bytes being fed (0 if before them)
	headLen   int    // bytes of the current header block so far
	firstLine bool   // the next line is a request line
	proto10   bool   // the request is HTTP/1.0
	hasCL     bool
	hasTE     bool
	length    int64 // the Content-Length
	left      int64 // body or chunk bytes still to come
}

type h1State uint8

const (
	h1Head      h1State = iota // header block lines
	h1Body                     // left bytes of Content-Length body
	h1ChunkSize                // a chunk-size line
	h1ChunkData                // left bytes of chunk data and its CRLF
	h1Trailer                  // trailer lines after the last chunk
	h1Stopped                  // not following any more
)

// h1MaxHead is a header block size net/http never accepts: it answers 431
// past MaxHeaderBytes plus 4 KiB read for a request, and at most its 4 KiB
// read buffer may have come in before it began counting. Following stops
// only past this, so that no header block net/http accepts goes unchecked.
const h1MaxHead = 2 * (maxHeaderBytes + 4096)

// h1MaxChunkLine bounds a chunk-size line, as net/http does (4 KiB).
const h1MaxChunkLine = 4096

// feed follows b, the next bytes the client sent, and returns the index in
// b of the byte to replace with a NUL when a header block turns out
// ambiguous, or -1. (When the blank line's CR came in an earlier read, its
// LF is the byte.)
func (f *h1Framing) feed(b []byte) (poison int) {
	if f.state == h1Head && f.headLen == 0 && len(f.line) == 0 {
		f.firstLine = true
	}
	f.lineStart = 0
	for i := 0; i < len(b); {
		switch f.state {
		case h1Stopped:
			return -1
		case h1Body, h1ChunkData:
			n := int64(len(b) - i)
			if n > f.left {
				n = f.left
			}
			f.left -= n
			i += int(n)
			if f.left == 0 {
				if f.state == h1Body {
					f.startHead()
				} else {
					f.state = h1ChunkSize
				}
				f.lineStart = i
			}
		default: // lines
			j := bytes.IndexByte(b[i:], '\n')
			end := len(b)
			if j >= 0 {
				end = i + j
			}
			f.line = append(f.line, b[i:end]...)
			if f.state == h1Head {
				f.headLen += end - i
				if j >= 0 {
					f.headLen++
				}
				if f.headLen > h1MaxHead {
					f.stop()
					return -1
				}
			} else if len(f.line) > h1MaxChunkLine {
				f.stop()
				return -1
			}
			if j < 0 {
				return -1
			}
			line := bytes.TrimSuffix(f.line, []byte("\r"))
			if f.state == h1Head && len(line) == 0 && !f.firstLine && f.hasCL && f.hasTE {
				f.stop()
				return f.lineStart
			}
			f.endLine(line)
			f.line = f.line[:0]
			i = end + 1
			f.lineStart = i
		}
	}
	return -1
}

// endLine takes a complete line (without its end).
func (f *h1Framing) endLine(line []byte) {
	switch f.state {
	case h1Head:
		switch {
		case f.firstLine:
			f.firstLine = false
			// method SP request-target SP version; net/http answers
			// anything else 400 and closes.
			sp := bytes.LastIndexByte(line, ' ')
			if sp < 0 {
				f.stop()
				return
			}
			f.proto10 = string(line[sp+1:]) == "HTTP/1.0"
		case len(line) == 0:
			f.endHead()
		case line[0] == ' ' || line[0] == '\t':
			// A folded continuation of the previous field's value.
		default:
			colon := bytes.IndexByte(line, ':')
			if colon < 0 {
				f.stop() // net/http: malformed header line
				return
			}
			name := line[:colon]
			value := bytes.Trim(line[colon+1:], " \t")
			switch {
			case asciiEqualFold(name, "Content-Length"):
				n, err := strconv.ParseInt(string(value), 10, 64)
				if err != nil || n < 0 || (f.hasCL && n != f.length) {
					// net/http answers a bad or conflicting
					// Content-Length 400 and closes.
					f.stop()
					return
				}
				f.hasCL, f.length = true, n
			case asciiEqualFold(name, "Transfer-Encoding"):
				f.hasTE = true
			}
		}
	case h1ChunkSize:
		if i := bytes.IndexAny(line, "; \t"); i >= 0 {
			line = line[:i]
		}
		n, err := strconv.ParseUint(string(line), 16, 62)
		switch {
		case err != nil:
			f.stop() // net/http fails the body read; the handler closes
		case n == 0:
			f.state = h1Trailer
		default:
			f.state, f.left = h1ChunkData, int64(n)+2 // and its CRLF
		}
	case h1Trailer:
		if len(line) == 0 {
			f.startHead()
		}
	}
}

// endHead decides the body framing of a complete header block, as net/http
// does: Transfer-Encoding (on HTTP/1.1) means chunked, else
// Content-Length, else no body.
func (f *h1Framing) endHead() {
	switch {
	case f.hasTE && !f.proto10:
		f.state = h1ChunkSize
	case f.length > 0:
		f.state, f.left = h1Body, f.length
	default:
		f.startHead()
	}
}

func (f *h1Framing) startHead() {
	*f = h1Framing{line: f.line[:0], lineStart: f.lineStart, firstLine: true}
	if cap(f.line) > 4096 {
		f.line = nil // do not keep a long line's buffer for the connection's life
	}
}

func (f *h1Framing) stop() {
	f.state = h1Stopped
	f.line = nil
}

// asciiEqualFold reports whether b equals the ASCII string s, ignoring
// case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
