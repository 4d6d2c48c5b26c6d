package api

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// Channels are the WebSocket channels of the API contract
// (docs/ARCHITECTURE.md), served at
// /api/ws/<channel>.
var Channels = []string{"backends", "metrics", "status", "health", "security", "billing", "ai"}

// Message is the envelope of every WebSocket message.
type Message struct {
	Type      string `json:"type"`
	Timestamp string `json:"timestamp"` // RFC 3339, UTC
	Data      any    `json:"data"`
}

// NewMessage stamps a message with the current time.
func NewMessage(typ string, data any) Message {
	return Message{Type: typ, Timestamp: time.Now().UTC().Format(time.RFC3339), Data: data}
}

// HubOptions tune the hub. Zero values take the defaults.
type HubOptions struct {
	QueueLen       int           // messages buffered per client; default 64
	WriteTimeout   time.Duration // per message; default 5s
	PingInterval   time.Duration // WebSocket ping frames; default 20s
	AllowedOrigins []string      // besides the same host; "*" allows any
	Logger         *slog.Logger
	// OnConnect returns the messages a new client of a channel gets right
	// after "connected": the channel's current state, so that a client
	// never waits for the next tick to see something.
	OnConnect func(channel string) []Message
}

const (
	readLimit = 4096 // client frames are tiny: {"type":"ping"}
	// closeTryAgainLater is sent to a client that fell behind (RFC 6455 1013).
	closeTryAgainLater = 1013
)

// Hub fans messages out to WebSocket clients, each subscribed to exactly
// one channel. Every client has a bounded queue; a client whose queue is
// full is disconnected instead of slowing anyone down.
type Hub struct {
	opts     HubOptions
	log      *slog.Logger
	upgrader websocket.Upgrader
	origins  atomic.Pointer[[]string] // AllowedOrigins in force

	mu      sync.Mutex
	clients map[string]map[*client]struct{}
}

type client struct {
	id      string
	channel string
	send    chan []byte
	closed  chan struct{}
	once    sync.Once
	conn    *websocket.Conn
	// closeCode/closeText are what the writer sends when closing.
	closeCode int
	closeText string
}

// NewHub returns a hub with no clients.
func NewHub(opts HubOptions) *Hub {
	if opts.QueueLen <= 0 {
		opts.QueueLen = 64
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 5 * time.Second
	}
	if opts.PingInterval <= 0 {
		opts.PingInterval = 20 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Hub{opts: opts, log: opts.Logger, clients: map[string]map[*client]struct{}{}}
	h.SetAllowedOrigins(opts.AllowedOrigins)
	for _, ch := range Channels {
		h.clients[ch] = map[*client]struct{}{}
	}
	h.upgrader = websocket.Upgrader{
		ReadBufferSize:  1024,
		WriteBufferSize: 4096,
		CheckOrigin:     h.checkOrigin,
		// Never echo "bearer.<token>": the answer names a protocol only.
		Subprotocols: []string{webSocketProtocol},
	}
	return h
}

// checkOrigin accepts requests without an Origin (non-browser clients), from
// the same host, or from a configured origin.
func (h *Hub) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	if strings.EqualFold(u.Host, r.Host) {
		return true
	}
	return h.listsOrigin(origin)
}

// listsOrigin reports whether origin is one of the allowed origins in force
// (api.allowed_origins), which admit browser pages to the REST API (CORS)
// as well as to the channels.
func (h *Hub) listsOrigin(origin string) bool {
	for _, allowed := range h.AllowedOrigins() {
		if allowed == "*" || strings.EqualFold(strings.TrimSuffix(allowed, "/"), origin) {
			return true
		}
	}
	return false
}

// Clients counts connected clients per channel.
func (h *Hub) Clients() map[string]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[string]int, len(h.clients))
	for ch, set := range h.clients {
		out[ch] = len(set)
	}
	return out
}

// Publish queues a message for every client of a channel. It never blocks:
// a client whose queue is full is closed with 1013 (try again later).
func (h *Hub) Publish(channel string, msg Message) {
	payload, err := json.Marshal(msg)
	if err != nil {
		h.log.Error("encode WebSocket message", "channel", channel, "type", msg.Type, "err", err)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.clients[channel] {
		select {
		case c.send <- payload:
		default:
			delete(h.clients[channel], c)
			c.shutdown(closeTryAgainLater, "client too slow: queue full")
		}
	}
}

// ServeChannel upgrades the request to a WebSocket on channel and serves it
// until the client goes away.
func (h *Hub) ServeChannel(w http.ResponseWriter, r *http.Request, channel string) error {
	if !slices.Contains(Channels, channel) {
		return fmt.Errorf("unknown channel %q", channel)
	}
	conn, err := h.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return nil // the upgrader has answered the request
	}
	c := &client{
		id:      newClientID(time.Now()),
		channel: channel,
		send:    make(chan []byte, h.opts.QueueLen),
		closed:  make(chan struct{}),
		conn:    conn,
	}
	greeting := []Message{NewMessage(MsgConnected, ConnectedData{ClientID: c.id, Status: "connected", Channel: channel})}
	if h.opts.OnConnect != nil {
		greeting = append(greeting, h.opts.OnConnect(channel)...)
	}
	for _, m := range greeting {
		b, err := json.Marshal(m)
		if err != nil {
			h.log.Error("encode WebSocket greeting", "channel", channel, "type", m.Type, "err", err)
			continue
		}
		c.send <- b // the queue is empty and larger than any greeting
	}
	h.mu.Lock()
	h.clients[channel][c] = struct{}{}
	h.mu.Unlock()
	h.log.Debug("WebSocket client connected", "channel", channel, "client_id", c.id, "remote", r.RemoteAddr)

	go h.writer(c)
	h.reader(c)
	h.remove(c)
	return nil
}

func (h *Hub) remove(c *client) {
	h.mu.Lock()
	delete(h.clients[c.channel], c)
	h.mu.Unlock()
	c.shutdown(websocket.CloseNormalClosure, "")
}

// shutdown makes the writer send a close frame and stop; idempotent.
func (c *client) shutdown(code int, text string) {
	c.once.Do(func() {
		c.closeCode, c.closeText = code, text
		close(c.closed)
	})
}

// reader handles client frames: pings get a pong, anything else an error
// message; a frame over the read limit ends the connection.
func (h *Hub) reader(c *client) {
	c.conn.SetReadLimit(readLimit)
	pongWait := 2 * h.opts.PingInterval
	c.conn.SetReadDeadline(time.Now().Add(pongWait))
	c.conn.SetPongHandler(func(string) error {
		return c.conn.SetReadDeadline(time.Now().Add(pongWait))
	})
	for {
		_, data, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		c.conn.SetReadDeadline(time.Now().Add(pongWait))
		var in struct {
			Type string `json:"type"`
		}
		var reply Message
		switch err := json.Unmarshal(data, &in); {
		case err != nil:
			reply = NewMessage(MsgError, ErrorData{Message: "invalid JSON: " + err.Error()})
		case in.Type == "ping":
			reply = NewMessage(MsgPong, PongData{ClientID: c.id})
		default:
			reply = NewMessage(MsgError, ErrorData{
				Message: fmt.Sprintf("unknown message type %q: clients may only send {\"type\":\"ping\"}", in.Type)})
		}
		b, _ := json.Marshal(reply)
		select {
		case c.send <- b:
		case <-c.closed:
			return
		default:
			// A client that floods pings without reading replies is slow.
			h.mu.Lock()
			delete(h.clients[c.channel], c)
			h.mu.Unlock()
			c.shutdown(closeTryAgainLater, "client too slow: queue full")
			return
		}
	}
}

// writer owns every write to the connection: queued messages, pings and
// the final close frame, each under a write deadline.
func (h *Hub) writer(c *client) {
	ping := time.NewTicker(h.opts.PingInterval)
	defer ping.Stop()
	defer c.conn.Close()
	for {
		select {
		case b := <-c.send:
			c.conn.SetWriteDeadline(time.Now().Add(h.opts.WriteTimeout))
			if err := c.conn.WriteMessage(websocket.TextMessage, b); err != nil {
				c.shutdown(websocket.CloseAbnormalClosure, "")
				return
			}
		case <-ping.C:
			if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(h.opts.WriteTimeout)); err != nil {
				c.shutdown(websocket.CloseAbnormalClosure, "")
				return
			}
		case <-c.closed:
			if c.closeCode != websocket.CloseAbnormalClosure {
				c.conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(c.closeCode, c.closeText),
					time.Now().Add(h.opts.WriteTimeout))
			}
			return
		}
	}
}

// newClientID is the contract's form: YYYYMMDDhhmmss-xxxxxx.
func newClientID(now time.Time) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	var b [6]byte
	rand.Read(b[:])
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return now.UTC().Format("20060102150405") + "-" + string(b[:])
}

// Close disconnects every client with 1001 (going away), for shutdown:
// hijacked WebSocket connections outlive http.Server.Shutdown otherwise.
func (h *Hub) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, set := range h.clients {
		for c := range set {
			c.shutdown(websocket.CloseGoingAway, "server shutting down")
			delete(set, c)
		}
	}
}

// SetAllowedOrigins replaces the origins allowed besides the same host; a
// reload changes them for the next upgrade.
func (h *Hub) SetAllowedOrigins(origins []string) {
	h.origins.Store(&origins)
}

// AllowedOrigins are the origins allowed besides the same host.
func (h *Hub) AllowedOrigins() []string {
	if p := h.origins.Load(); p != nil {
		return *p
	}
	return nil
}
