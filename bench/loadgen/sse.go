package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// One SSE connection: a raw TCP socket, a minimal HTTP/1.1 response reader (status line,
// headers, chunked or identity body) and an SSE line parser that counts frames, checks
// positions for gaps and duplicates and records latency from a timestamp embedded in the
// event. Everything runs on the connection's goroutine; shared counters are atomics.
//
// crm positions: the SSE id is an opaque cursor, kept as bytes and sent back unchanged as
// Last-Event-ID on a resume; it is never parsed. The sequence check is per partition, from
// the envelope's "partition" and "offset" (the bench's topics have no transactions and no
// compaction, so their offsets are contiguous and a jump is a gap).

const (
	// Replays arrive as ~400 KB writes: larger reads mean fewer syscalls and wake-ups.
	readBufSize   = 64 << 10
	maxParts      = 64
	dialTimeout   = 30 * time.Second
	headerTimeout = 120 * time.Second // a server working through a storm answers late
)

var (
	keyPartition = []byte(`"partition":`)
	keyOffset    = []byte(`"offset":`)
	keyTsMs      = []byte(`"timestamp_ms":`)
	keyTsUs      = []byte(`"bench_ts_us":`)
	keyPubs      = []byte(`"publications":[`)
	keyEpoch     = []byte(`"epoch":"`)
	keyRecovered = []byte(`"recovered":true`)
	prefConnect  = []byte(`{"connect":`)
	pingData     = []byte(`{}`)
	resetName    = []byte("reset")
)

// batch: parameters shared by the connections opened by one /connect command.
type batch struct {
	id        int
	t0        time.Time
	n         int
	expect    int64   // per-connection event count that means "caught up" (0: not tracked)
	lei       string  // crm: Last-Event-ID (an opaque cursor) of the first request
	leiParts  []int64 // crm: per partition, the newest offset lei covers (-1: unknown)
	cfRecover bool
	cfOffset  uint64
	cfEpoch   string
	latency   bool   // record latency of events (off for replays of old events)
	reconnect string // "", "fresh" or "resume": what to do when a stream ends
	// lifeMin..lifeMax > 0: each stream is closed by the client after a lifetime drawn
	// uniformly from this range (a user's tab closing, a phone changing networks), then
	// reopened as reconnect says; the soak's churn.
	lifeMin  time.Duration
	lifeMax  time.Duration
	caught   atomic.Int64
	caughtH  hist // time from t0 until each connection reached expect, microseconds
	connectH hist // time from t0 until each connection's response headers, microseconds
	opened   atomic.Int64
}

type sseConn struct {
	g   *gen
	b   *batch
	src net.IP

	mu     sync.Mutex
	nc     net.Conn
	closed bool

	events atomic.Int64
	caught bool

	// Position of the newest event, for resuming (crm: the cursor's bytes; cf: offset +
	// epoch). partLast: per partition, the newest offset received (-1: none yet); atomic
	// because /stats reads it from another goroutine.
	lastID   []byte
	hasLast  bool
	cfLast   int64
	cfEpoch  string
	partLast [maxParts]atomic.Int64

	// parser state
	chunked   bool
	chunkLeft int64 // >0: data bytes left in the chunk; 0: reading a size line; -1: CRLF
	sizeLine  []byte
	line      []byte
	curID     []byte
	eventName []byte
	now       time.Time
	nowUs     int64
}

// errDropped: the stream was closed by the client itself at the end of its lifetime.
var errDropped = errors.New("dropped by the client (lifetime)")

func (b *batch) lifetime() time.Duration {
	if b.lifeMax <= 0 {
		return 0
	}
	return b.lifeMin + time.Duration(rand.Int63n(int64(b.lifeMax-b.lifeMin)+1))
}

func (c *sseConn) resetPositions() {
	for i := range c.partLast {
		c.partLast[i].Store(-1)
	}
}

func (c *sseConn) close() {
	c.mu.Lock()
	c.closed = true
	nc := c.nc
	c.mu.Unlock()
	if nc != nil {
		_ = nc.Close()
	}
}

func (c *sseConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// run opens the stream (again, when the batch asks to reconnect) until closed.
func (c *sseConn) run(sem chan struct{}) {
	g := c.g
	c.cfLast = -1
	c.resetPositions()
	if c.b.lei != "" {
		c.lastID = []byte(c.b.lei)
		c.hasLast = true
		for p, off := range c.b.leiParts {
			if p < maxParts {
				c.partLast[p].Store(off)
			}
		}
	}
	if c.b.cfRecover {
		c.cfLast = int64(c.b.cfOffset)
		c.cfEpoch = c.b.cfEpoch
	}
	first := true
	resume := c.b.lei != "" || c.b.cfRecover
	for attempt := 0; ; attempt++ {
		if c.isClosed() || g.stopping.Load() {
			return
		}
		if sem != nil && first {
			sem <- struct{}{}
		}
		err := c.session(first, resume, sem)
		first = false
		dropped := errors.Is(err, errDropped)
		if dropped {
			// A client's own choice, not a failure: reconnect at once, as a fresh page
			// or a client library would, and start the backoff over.
			attempt = -1
		}
		if c.isClosed() || g.stopping.Load() {
			return
		}
		if err != nil && !dropped {
			g.errMu.Lock()
			g.lastErr = err.Error()
			g.errMu.Unlock()
		}
		switch c.b.reconnect {
		case "fresh":
			resume = false
			c.cfLast = -1
			c.resetPositions()
			c.hasLast = false
		case "resume":
			resume = c.hasLast || c.cfLast >= 0
		default:
			return
		}
		// Back off like a client library would: 0.1 s doubling to 2 s, with jitter.
		delay := 100 * time.Millisecond << uint(min(max(attempt, 0), 5))
		if delay > 2*time.Second {
			delay = 2 * time.Second
		}
		time.Sleep(delay/2 + time.Duration(rand.Int63n(int64(delay/2)+1)))
	}
}

func (c *sseConn) requestPath(resume bool) string {
	g := c.g
	if g.mode == "cf" {
		sub := `{}`
		if resume && c.cfLast >= 0 && c.cfEpoch != "" {
			sub = fmt.Sprintf(`{"recover":true,"offset":%d,"epoch":%q}`, c.cfLast, c.cfEpoch)
		}
		connect := fmt.Sprintf(`{"subs":{%q:%s}}`, g.channel, sub)
		return g.path + "?cf_connect=" + url.QueryEscape(connect)
	}
	return g.path
}

// session: one HTTP request and its stream. Returns when the stream ends.
func (c *sseConn) session(first, resume bool, sem chan struct{}) error {
	g := c.g
	released := sem == nil || !first
	release := func() {
		if !released {
			released = true
			<-sem
		}
	}
	defer release()
	d := net.Dialer{Timeout: dialTimeout, LocalAddr: &net.TCPAddr{IP: c.src}}
	nc, err := d.Dial("tcp", g.target)
	if err != nil {
		g.connectFail.Add(1)
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		_ = nc.Close()
		return nil
	}
	c.nc = nc
	c.mu.Unlock()
	defer nc.Close()

	req := "GET " + c.requestPath(resume) + " HTTP/1.1\r\nHost: " + g.target +
		"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n" + g.authHeader
	if g.mode == "crm" && resume && c.hasLast {
		req += "Last-Event-ID: " + string(c.lastID) + "\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(nc, req); err != nil {
		g.connectFail.Add(1)
		return err
	}
	buf := make([]byte, readBufSize)
	body, err := c.readHeaders(nc, buf)
	if err != nil {
		g.connectFail.Add(1)
		return err
	}
	release()
	if first {
		c.b.connectH.record(uint64(time.Since(c.b.t0).Microseconds()))
		c.b.opened.Add(1)
	}
	g.connected.Add(1)
	defer g.connected.Add(-1)
	var dropped atomic.Bool
	if life := c.b.lifetime(); life > 0 {
		t := time.AfterFunc(life, func() {
			dropped.Store(true)
			_ = nc.Close()
		})
		defer t.Stop()
	}
	c.chunkLeft = 0
	c.sizeLine = c.sizeLine[:0]
	c.line = c.line[:0]
	if len(body) > 0 {
		c.stamp()
		if !c.feedBody(body) {
			g.ended.Add(1)
			return fmt.Errorf("stream ended by the server")
		}
	}
	for {
		n, err := nc.Read(buf)
		if n > 0 {
			g.bytes.Add(uint64(n))
			c.stamp()
			if !c.feedBody(buf[:n]) {
				g.ended.Add(1)
				return fmt.Errorf("stream ended by the server")
			}
		}
		if err != nil {
			if dropped.Load() {
				g.drops.Add(1)
				return errDropped
			}
			if !c.isClosed() && !g.stopping.Load() {
				g.disconnects.Add(1)
			}
			return err
		}
	}
}

func (c *sseConn) stamp() {
	c.now = time.Now()
	c.nowUs = c.now.UnixMicro()
}

// readHeaders reads the status line and headers; returns body bytes that came with them.
func (c *sseConn) readHeaders(nc net.Conn, buf []byte) ([]byte, error) {
	var acc []byte
	_ = nc.SetReadDeadline(time.Now().Add(headerTimeout))
	defer nc.SetReadDeadline(time.Time{})
	for len(acc) < 64<<10 {
		n, err := nc.Read(buf)
		if n > 0 {
			acc = append(acc, buf[:n]...)
			if i := bytes.Index(acc, []byte("\r\n\r\n")); i >= 0 {
				head := acc[:i]
				lineEnd := bytes.IndexByte(head, '\n')
				if lineEnd < 0 {
					lineEnd = len(head)
				}
				status := bytes.Fields(head[:lineEnd])
				if len(status) < 2 || string(status[1]) != "200" {
					code := "?"
					if len(status) >= 2 {
						code = string(status[1])
					}
					c.g.countStatus(code)
					return nil, fmt.Errorf("status %q", bytes.TrimSpace(head[:lineEnd]))
				}
				lower := bytes.ToLower(head)
				c.chunked = bytes.Contains(lower, []byte("transfer-encoding: chunked"))
				return acc[i+4:], nil
			}
		}
		if err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("response headers too long")
}

// feedBody decodes the transfer encoding; false when the body ended (last chunk).
func (c *sseConn) feedBody(p []byte) bool {
	if !c.chunked {
		c.feedSSE(p)
		return true
	}
	for len(p) > 0 {
		switch {
		case c.chunkLeft > 0:
			n := int64(len(p))
			if n > c.chunkLeft {
				n = c.chunkLeft
			}
			c.feedSSE(p[:n])
			p = p[n:]
			c.chunkLeft -= n
			if c.chunkLeft == 0 {
				c.chunkLeft = -1
			}
		case c.chunkLeft == -1: // CRLF after chunk data
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				return true
			}
			p = p[i+1:]
			c.chunkLeft = 0
		default: // size line
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				c.sizeLine = append(c.sizeLine, p...)
				return true
			}
			c.sizeLine = append(c.sizeLine, p[:i]...)
			p = p[i+1:]
			s := c.sizeLine
			if j := bytes.IndexAny(s, ";\r"); j >= 0 {
				s = s[:j]
			}
			size, err := strconv.ParseInt(string(bytes.TrimSpace(s)), 16, 64)
			c.sizeLine = c.sizeLine[:0]
			if err != nil {
				c.g.parseErrors.Add(1)
				return false
			}
			if size == 0 {
				return false
			}
			c.chunkLeft = size
		}
	}
	return true
}

func (c *sseConn) feedSSE(p []byte) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			c.line = append(c.line, p...)
			return
		}
		var ln []byte
		if len(c.line) > 0 {
			c.line = append(c.line, p[:i]...)
			ln = c.line
		} else {
			ln = p[:i]
		}
		p = p[i+1:]
		if n := len(ln); n > 0 && ln[n-1] == '\r' {
			ln = ln[:n-1]
		}
		c.handleLine(ln)
		if cap(c.line) > 256<<10 {
			c.line = nil // free a large replay line
		} else {
			c.line = c.line[:0]
		}
	}
}

func fieldValue(ln []byte, name int) []byte {
	v := ln[name:]
	if len(v) > 0 && v[0] == ' ' {
		v = v[1:]
	}
	return v
}

func (c *sseConn) handleLine(ln []byte) {
	if len(ln) == 0 { // end of an event
		c.curID = c.curID[:0]
		c.eventName = c.eventName[:0]
		return
	}
	switch {
	case ln[0] == ':':
		c.g.comments.Add(1)
	case bytes.HasPrefix(ln, []byte("data:")):
		c.onData(fieldValue(ln, 5))
	case bytes.HasPrefix(ln, []byte("id:")):
		c.curID = append(c.curID[:0], fieldValue(ln, 3)...)
	case bytes.HasPrefix(ln, []byte("event:")):
		c.eventName = append(c.eventName[:0], fieldValue(ln, 6)...)
	}
}

// intAfter parses the integer that follows key in p, searching from start; returns the
// value and the index just past it, or ok=false.
func intAfter(p []byte, key []byte, start int) (v int64, end int, ok bool) {
	if start > len(p) {
		return 0, start, false
	}
	i := bytes.Index(p[start:], key)
	if i < 0 {
		return 0, start, false
	}
	j := start + i + len(key)
	neg := false
	if j < len(p) && p[j] == '-' {
		neg = true
		j++
	}
	k := j
	for k < len(p) && p[k] >= '0' && p[k] <= '9' {
		v = v*10 + int64(p[k]-'0')
		k++
	}
	if k == j {
		return 0, k, false
	}
	if neg {
		v = -v
	}
	return v, k, true
}

func (c *sseConn) onData(d []byte) {
	if c.g.mode == "cf" {
		c.onCentrifugo(d)
		return
	}
	g := c.g
	if len(c.eventName) > 0 { // a control event (reset)
		g.control.Add(1)
		if bytes.Equal(c.eventName, resetName) {
			// Some partitions continue from their oldest retained event: their next offsets
			// are not known here, so every partition starts its check afresh.
			g.resets.Add(1)
			c.resetPositions()
			if len(c.curID) > 0 {
				c.lastID = append(c.lastID[:0], c.curID...)
				c.hasLast = true
			}
		}
		return
	}
	if len(c.curID) > 0 {
		// The cursor covers this event even when it turns out to be a duplicate. Swap the
		// buffers rather than copy: curID is refilled by the next "id:" line.
		c.lastID, c.curID = c.curID, c.lastID[:0]
		c.hasLast = true
	} else {
		g.parseErrors.Add(1) // every crm event carries its cursor
	}
	part, i, ok1 := intAfter(d, keyPartition, 0)
	// The envelope puts "offset" right after "partition": look there before searching.
	var off int64
	var ok2 bool
	if ok1 && i < len(d) && d[i] == ',' && bytes.HasPrefix(d[i+1:], keyOffset) {
		off, i, ok2 = intAfter(d, keyOffset, i+1)
	} else {
		off, i, ok2 = intAfter(d, keyOffset, i)
	}
	if !ok1 || !ok2 || part < 0 || part >= maxParts {
		g.parseErrors.Add(1)
	} else {
		if !g.follows(c.partLast[part].Load(), off) {
			return
		}
		c.partLast[part].Store(off)
	}
	if c.b.latency {
		if ts, _, ok := intAfter(d, keyTsMs, i); ok {
			lat := c.nowUs - ts*1000
			if lat < 0 {
				lat = 0
			}
			g.lat.record(uint64(lat))
		}
	}
	c.countEvent()
}

func (c *sseConn) countEvent() {
	c.g.events.Add(1)
	n := c.events.Add(1)
	if !c.caught && c.b.expect > 0 && n >= c.b.expect {
		c.caught = true
		c.b.caught.Add(1)
		c.b.caughtH.record(uint64(c.now.Sub(c.b.t0).Microseconds()))
	}
}

// onCentrifugo handles one uni_sse data line: a ping ({}), the connect push (possibly with
// recovered publications) or a publication push.
func (c *sseConn) onCentrifugo(d []byte) {
	g := c.g
	if bytes.Equal(d, pingData) {
		g.pings.Add(1)
		return
	}
	if bytes.HasPrefix(d, prefConnect) {
		g.control.Add(1)
		rest := d
		if i := bytes.Index(d, keyPubs); i >= 0 {
			// Recovered publications: flat payloads of ours never contain ']' so the first
			// one closes the array.
			arr := d[i+len(keyPubs):]
			end := bytes.IndexByte(arr, ']')
			if end < 0 {
				g.parseErrors.Add(1)
				return
			}
			rest = arr[end:]
			arr = arr[:end]
			pos := 0
			for {
				off, next, ok := intAfter(arr, keyOffset, pos)
				if !ok {
					break
				}
				c.cfPub(off, 0)
				pos = next
			}
			g.recovered.Add(1)
		}
		if c.b.cfRecover && !bytes.Contains(d, keyRecovered) {
			g.recoverFailed.Add(1)
		}
		if j := bytes.Index(d, keyEpoch); j >= 0 {
			e := d[j+len(keyEpoch):]
			if k := bytes.IndexByte(e, '"'); k >= 0 {
				c.cfEpoch = string(e[:k])
			}
		}
		if top, _, ok := intAfter(rest, keyOffset, 0); ok && c.cfLast < 0 {
			c.cfLast = top
		}
		return
	}
	// {"channel":"..","pub":{"data":{...},"offset":N}}: the offset is the last one.
	i := bytes.LastIndex(d, keyOffset)
	if i < 0 {
		g.control.Add(1)
		return
	}
	off, _, ok := intAfter(d, keyOffset, i)
	if !ok {
		g.parseErrors.Add(1)
		return
	}
	var lat int64 = -1
	if c.b.latency {
		if ts, _, ok := intAfter(d, keyTsUs, 0); ok {
			lat = c.nowUs - ts
			if lat < 0 {
				lat = 0
			}
		}
	}
	c.cfPub(off, lat)
}

// follows checks that off continues a sequence whose newest value is last (-1: none yet).
// A repeat counts as a duplicate and returns false (the event is dropped); a jump counts
// the missing values as gaps.
func (g *gen) follows(last, off int64) bool {
	switch {
	case last < 0 || off == last+1:
	case off <= last:
		g.dups.Add(1)
		return false
	default:
		g.gaps.Add(uint64(off - last - 1))
	}
	return true
}

func (c *sseConn) cfPub(off int64, lat int64) {
	g := c.g
	if !g.follows(c.cfLast, off) {
		return
	}
	c.cfLast = off
	c.hasLast = true
	if lat >= 0 {
		g.lat.record(uint64(lat))
	}
	c.countEvent()
}
