package bgp

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	gbgp "github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"golang.org/x/sys/unix"
)

// CloseSessions makes the peers drop every route this node announced, now,
// when no speaker runs: after an agent stopped with graceful restart, the
// routers keep its routes for the restart time, which is right while the
// data path forwards and wrong once it is taken down. For each peer it
// opens a session without the graceful restart capability, which tells
// the router to delete the stale routes at once (RFC 4724, 4.2), and
// closes it with a Cease NOTIFICATION (administrative shutdown). The peers
// are handled in parallel; the error names each one that failed.
func CloseSessions(ctx context.Context, asn uint32, routerID netip.Addr, peers []Peer) error {
	errs := make([]error, len(peers))
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Go(func() {
			if err := closeSessionRetrying(ctx, asn, routerID, p); err != nil {
				errs[i] = fmt.Errorf("bgp: close the session with %s: %w", p.Address, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// closeRetryEvery paces attempts: a router refuses connections for a
// moment after a session went down (its idle hold time).
const closeRetryEvery = 200 * time.Millisecond

// closeSessionRetrying tries until one attempt succeeds or ctx ends, and
// returns the last attempt's error.
func closeSessionRetrying(ctx context.Context, asn uint32, routerID netip.Addr, p Peer) error {
	for {
		err := closeSession(ctx, asn, routerID, p)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(closeRetryEvery):
		}
	}
}

func closeSession(ctx context.Context, asn uint32, routerID netip.Addr, p Peer) error {
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error { return sessionSockopts(rc, p) }}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(p.Address.String(), strconv.Itoa(int(p.port()))))
	if err != nil {
		return err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return err
		}
	}
	hold := uint16(p.HoldTime / time.Second)
	as2 := uint16(gbgp.AS_TRANS)
	if asn <= 0xffff {
		as2 = uint16(asn)
	}
	caps := []gbgp.ParameterCapabilityInterface{
		gbgp.NewCapMultiProtocol(gbgp.RF_IPv4_UC),
		gbgp.NewCapMultiProtocol(gbgp.RF_IPv6_UC),
		gbgp.NewCapFourOctetASNumber(asn),
	}
	open, err := gbgp.NewBGPOpenMessage(as2, hold, routerID, []gbgp.OptionParameterInterface{gbgp.NewOptionParameterCapability(caps)})
	if err != nil {
		return err
	}
	if err := send(conn, open); err != nil {
		return err
	}
	// OPEN, then KEEPALIVE: the session is established once the peer
	// confirmed ours, and the stale routes are gone with its OPEN.
	for _, want := range []uint8{gbgp.BGP_MSG_OPEN, gbgp.BGP_MSG_KEEPALIVE} {
		msg, err := receive(conn)
		if err != nil {
			return err
		}
		if n, ok := msg.Body.(*gbgp.BGPNotification); ok {
			return fmt.Errorf("the peer refused the session: NOTIFICATION code %d subcode %d", n.ErrorCode, n.ErrorSubcode)
		}
		if msg.Header.Type != want {
			return fmt.Errorf("the peer sent message type %d, want %d", msg.Header.Type, want)
		}
		if want == gbgp.BGP_MSG_OPEN {
			if err := send(conn, gbgp.NewBGPKeepAliveMessage()); err != nil {
				return err
			}
		}
	}
	holdOpen(ctx, conn)
	return send(conn, gbgp.NewBGPNotificationMessage(gbgp.BGP_ERROR_CEASE, gbgp.BGP_ERROR_SUB_ADMINISTRATIVE_SHUTDOWN, nil))
}

// closeHold is how long an established session stays up before its Cease.
// A router may act on the new session (dropping the stale routes) after it
// confirmed it; a Cease right behind the KEEPALIVE can reach it first, and
// under load GoBGP then kept the routes.
const closeHold = time.Second

// holdOpen keeps conn up for closeHold, or until ctx ends, the peer sends
// a NOTIFICATION or the connection fails, reading and discarding what the
// peer sends meanwhile (its UPDATEs and KEEPALIVEs).
func holdOpen(ctx context.Context, conn net.Conn) {
	until := time.Now().Add(closeHold)
	if d, ok := ctx.Deadline(); ok && d.Before(until) {
		until = d
	}
	if conn.SetReadDeadline(until) != nil {
		return
	}
	for {
		msg, err := receive(conn)
		if err != nil {
			return
		}
		if _, ok := msg.Body.(*gbgp.BGPNotification); ok {
			return
		}
	}
}

// sessionSockopts sets what the peer expects of our packets: the TCP MD5
// key and, for a multihop peer, the TTL.
func sessionSockopts(rc syscall.RawConn, p Peer) error {
	var opErr error
	err := rc.Control(func(fd uintptr) {
		if p.Password != "" {
			sig := unix.TCPMD5Sig{Keylen: uint16(len(p.Password))}
			copy(sig.Key[:], p.Password)
			if p.Address.Is4() {
				sig.Addr.Family = unix.AF_INET
				a := p.Address.As4()
				copy(sig.Addr.Data[2:], a[:])
			} else {
				sig.Addr.Family = unix.AF_INET6
				a := p.Address.As16()
				copy(sig.Addr.Data[6:], a[:])
			}
			if opErr = unix.SetsockoptTCPMD5Sig(int(fd), unix.IPPROTO_TCP, unix.TCP_MD5SIG, &sig); opErr != nil {
				opErr = fmt.Errorf("set the TCP MD5 key: %w", opErr)
				return
			}
		}
		if p.Multihop > 0 {
			level, opt := unix.IPPROTO_IP, unix.IP_TTL
			if p.Address.Is6() {
				level, opt = unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS
			}
			if opErr = unix.SetsockoptInt(int(fd), level, opt, int(p.Multihop)); opErr != nil {
				opErr = fmt.Errorf("set the TTL to %d: %w", p.Multihop, opErr)
			}
		}
	})
	return errors.Join(err, opErr)
}

func send(w io.Writer, msg *gbgp.BGPMessage) error {
	b, err := msg.Serialize()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func receive(r io.Reader) (*gbgp.BGPMessage, error) {
	head := make([]byte, gbgp.BGP_HEADER_LENGTH)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, fmt.Errorf("read a message header: %w", err)
	}
	n := int(binary.BigEndian.Uint16(head[16:18]))
	if n < gbgp.BGP_HEADER_LENGTH || n > 65535 {
		return nil, fmt.Errorf("bad message length %d", n)
	}
	buf := make([]byte, n)
	copy(buf, head)
	if _, err := io.ReadFull(r, buf[gbgp.BGP_HEADER_LENGTH:]); err != nil {
		return nil, fmt.Errorf("read a message body: %w", err)
	}
	return gbgp.ParseBGPMessage(buf)
}
