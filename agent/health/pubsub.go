package health

import "sync"

// Subscribe returns a channel of verdict changes and a function that ends
// the subscription and closes the channel. The channel is also closed when
// Run returns; subscribing after that returns a closed channel.
//
// A subscriber that reads slowly, or not at all, never blocks the checker or
// other subscribers. Its channel holds buf events (buf < 0 means 0); beyond
// that, undelivered events are queued per key and a newer event for a key
// replaces the queued one. A slow subscriber may therefore miss intermediate
// flaps, counted by DroppedEvents, but the last event it receives for every
// key is always that key's current verdict, which is what a consumer
// mirroring verdicts (the data plane, the proxy) needs. The queue is bounded
// by the number of keys.
func (c *Checker) Subscribe(buf int) (<-chan Event, func()) {
	s := &subscriber{
		ch:     make(chan Event, max(buf, 0)),
		wake:   make(chan struct{}, 1),
		quit:   make(chan struct{}),
		latest: make(map[string]Event),
	}
	c.subMu.Lock()
	select {
	case <-c.stopped:
		c.subMu.Unlock()
		close(s.ch)
		return s.ch, func() {}
	default:
	}
	c.subs[s] = struct{}{}
	c.subMu.Unlock()

	go s.forward(c.stopped)

	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			c.subMu.Lock()
			delete(c.subs, s) // no-op on the nil map after Run returned
			c.subMu.Unlock()
			close(s.quit)
		})
	}
}

// DroppedEvents returns how many events were replaced by a newer event for
// the same key before a slow subscriber received them, summed over all
// subscribers.
func (c *Checker) DroppedEvents() uint64 {
	return c.dropped.Load()
}

// publish hands ev to every subscriber without blocking.
func (c *Checker) publish(ev Event) {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	for s := range c.subs {
		if s.enqueue(ev) {
			c.dropped.Add(1)
		}
	}
}

// subscriber decouples one consumer from the checker: publish only touches
// the queue under mu, and the forward goroutine does the possibly blocking
// channel sends.
type subscriber struct {
	ch   chan Event
	wake chan struct{} // capacity 1: "the queue may be non-empty"
	quit chan struct{} // closed by the unsubscribe function

	mu     sync.Mutex
	order  []string         // queued keys, oldest first
	latest map[string]Event // queued event per key
}

// enqueue queues ev and reports whether it replaced an undelivered event.
func (s *subscriber) enqueue(ev Event) (replaced bool) {
	s.mu.Lock()
	if _, replaced = s.latest[ev.Key]; !replaced {
		s.order = append(s.order, ev.Key)
	}
	s.latest[ev.Key] = ev
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
	return replaced
}

// next dequeues the oldest queued event.
func (s *subscriber) next() (Event, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.order) == 0 {
		return Event{}, false
	}
	key := s.order[0]
	s.order[0] = "" // let the string be collected
	s.order = s.order[1:]
	ev := s.latest[key]
	delete(s.latest, key)
	return ev, true
}

// forward moves queued events to the channel until the subscription ends or
// the checker stops, then closes the channel.
func (s *subscriber) forward(stopped <-chan struct{}) {
	defer close(s.ch)
	for {
		ev, ok := s.next()
		if !ok {
			select {
			case <-s.wake:
				continue
			case <-s.quit:
				return
			case <-stopped:
				return
			}
		}
		select {
		case s.ch <- ev:
		case <-s.quit:
			return
		case <-stopped:
			return
		}
	}
}
