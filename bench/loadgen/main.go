// Command loadgen opens many SSE connections to a crm-events edge ("crm" mode) or to
// Centrifugo's uni_sse endpoint ("cf" mode), counts every frame, checks positions for gaps
// and duplicates per connection and records delivery latency from a timestamp embedded in
// each event. It is driven over a small HTTP control API on loopback by bench/ (Python):
//
//	GET /connect?n=N&rate=R&inflight=K&expect=E&lei=CURSOR&lei_parts=OFFS&cf_recover=1
//	             &cf_offset=O&cf_epoch=E&latency=1&reconnect=fresh|resume
//	             &life_min_ms=A&life_max_ms=B   each stream closed by the client after A..B ms
//	                                                    open N more connections (a batch)
//	GET /stats?reset=1&batch=B&expect_last=OFFS         counters (JSON); reset starts a window
//	GET /close                                          close every connection
//	GET /quit                                           exit
//
// crm positions: lei is an opaque cursor, sent as Last-Event-ID. OFFS lists per partition
// the newest offset, comma-separated in partition order, "-" for none ("17,-,4"): for
// lei_parts, what the cursor covers (so the first event after the resume is checked too);
// for expect_last, what a connection must have received last to count as caught up.
//
// No dependencies beyond the standard library.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type gen struct {
	mode    string
	target  string
	path    string
	channel string
	// authHeader: "Authorization: Bearer ...\r\n" for every stream request, or "".
	authHeader string
	sources    []net.IP
	nextSrc    atomic.Uint64

	stopping atomic.Bool

	connected     atomic.Int64
	connectFail   atomic.Uint64
	disconnects   atomic.Uint64
	drops         atomic.Uint64 // streams the client closed itself (batch lifetime)
	ended         atomic.Uint64
	events        atomic.Uint64
	totalEvents   atomic.Uint64
	bytes         atomic.Uint64
	comments      atomic.Uint64
	pings         atomic.Uint64
	control       atomic.Uint64
	resets        atomic.Uint64
	recovered     atomic.Uint64
	recoverFailed atomic.Uint64
	gaps          atomic.Uint64
	dups          atomic.Uint64
	parseErrors   atomic.Uint64
	lat           hist

	errMu    sync.Mutex
	lastErr  string
	statuses map[string]uint64 // non-200 answers to stream requests, by status code

	mu          sync.Mutex
	conns       []*sseConn
	batches     []*batch
	windowStart time.Time
	cpuAtStart  [2]float64
}

func (g *gen) countStatus(code string) {
	g.errMu.Lock()
	if g.statuses == nil {
		g.statuses = map[string]uint64{}
	}
	g.statuses[code]++
	g.errMu.Unlock()
}

func cpuTimes() (user, sys float64) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime), tv(ru.Stime)
}

func rssKB() int64 {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				return v
			}
		}
	}
	return 0
}

func raiseNofile(want uint64) uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	if rl.Max < want {
		// Raising the hard limit needs CAP_SYS_RESOURCE (root); else stay within it.
		try := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &try); err == nil {
			return want
		}
		want = rl.Max
	}
	rl.Cur = want
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	return rl.Cur
}

func qInt(r *http.Request, name string, def int64) int64 {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return def
	}
	return n
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func (g *gen) handleConnect(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	n := int(qInt(r, "n", 0))
	rate := float64(qInt(r, "rate", 0))
	inflight := int(qInt(r, "inflight", 0))
	b := &batch{
		n:         n,
		t0:        time.Now(),
		expect:    qInt(r, "expect", 0),
		lei:       q.Get("lei"),
		leiParts:  parseOffsets(q.Get("lei_parts")),
		cfRecover: q.Get("cf_recover") == "1",
		cfOffset:  uint64(qInt(r, "cf_offset", 0)),
		cfEpoch:   q.Get("cf_epoch"),
		latency:   q.Get("latency") != "0",
		reconnect: q.Get("reconnect"),
	}
	// Bounded before converting: a week is longer than any soak, and keeps the durations
	// (and lifeMax-lifeMin+1 in lifetime) far from overflowing.
	lifeMinMs, lifeMaxMs := qInt(r, "life_min_ms", 0), qInt(r, "life_max_ms", 0)
	if lifeMinMs < 0 || lifeMaxMs < lifeMinMs || lifeMaxMs > 7*24*3600*1000 {
		http.Error(w, "want 0 <= life_min_ms <= life_max_ms <= 7 days", http.StatusBadRequest)
		return
	}
	b.lifeMin = time.Duration(lifeMinMs) * time.Millisecond
	b.lifeMax = time.Duration(lifeMaxMs) * time.Millisecond
	g.mu.Lock()
	b.id = len(g.batches)
	g.batches = append(g.batches, b)
	conns := make([]*sseConn, n)
	for i := range conns {
		src := g.sources[g.nextSrc.Add(1)%uint64(len(g.sources))]
		conns[i] = &sseConn{g: g, b: b, src: src}
	}
	g.conns = append(g.conns, conns...)
	g.mu.Unlock()
	var sem chan struct{}
	if inflight > 0 {
		sem = make(chan struct{}, inflight)
	}
	go func() {
		for i, c := range conns {
			if rate > 0 {
				due := b.t0.Add(time.Duration(float64(i) / rate * float64(time.Second)))
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
			}
			if g.stopping.Load() {
				return
			}
			go c.run(sem)
		}
	}()
	writeJSON(w, map[string]any{"batch": b.id, "n": n})
}

type batchStats struct {
	ID         int         `json:"id"`
	N          int         `json:"n"`
	Opened     int64       `json:"opened"`
	Caught     int64       `json:"caught"`
	Expect     int64       `json:"expect"`
	ElapsedS   float64     `json:"elapsed_s"`
	CaughtUs   histSummary `json:"caught_us"`
	ConnectUs  histSummary `json:"connect_us"`
	EventsMin  int64       `json:"events_min"`
	EventsMax  int64       `json:"events_max"`
	EventsSum  int64       `json:"events_sum"`
	AtExpect   int64       `json:"at_expect"`
	LastIDSeen int64       `json:"expect_last_seen"`
}

func (g *gen) batchStats(b *batch, expectLast string) batchStats {
	s := batchStats{
		ID: b.id, N: b.n, Opened: b.opened.Load(), Caught: b.caught.Load(), Expect: b.expect,
		ElapsedS: time.Since(b.t0).Seconds(),
		CaughtUs: b.caughtH.snapshot(false), ConnectUs: b.connectH.snapshot(false),
		EventsMin: -1,
	}
	want := parseOffsets(expectLast)
	g.mu.Lock()
	conns := g.conns
	g.mu.Unlock()
	for _, c := range conns {
		if c.b != b {
			continue
		}
		e := c.events.Load()
		if s.EventsMin < 0 || e < s.EventsMin {
			s.EventsMin = e
		}
		if e > s.EventsMax {
			s.EventsMax = e
		}
		s.EventsSum += e
		if b.expect > 0 && e == b.expect {
			s.AtExpect++
		}
		if want != nil && c.reached(want) {
			s.LastIDSeen++
		}
	}
	return s
}

// parseOffsets reads "17,-,4" (per partition, the newest offset; "-" for none) into
// [17, -1, 4]; nil for an empty or malformed list. Not on the hot path.
func parseOffsets(text string) []int64 {
	if text == "" {
		return nil
	}
	fields := strings.Split(text, ",")
	if len(fields) > maxParts {
		return nil
	}
	out := make([]int64, len(fields))
	for i, f := range fields {
		if f == "-" {
			out[i] = -1
			continue
		}
		v, err := strconv.ParseInt(f, 10, 64)
		if err != nil || v < 0 {
			return nil
		}
		out[i] = v
	}
	return out
}

// reached: the connection's newest offset in every partition is the wanted one.
func (c *sseConn) reached(want []int64) bool {
	for p, off := range want {
		if c.partLast[p].Load() != off {
			return false
		}
	}
	return true
}

func (g *gen) handleStats(w http.ResponseWriter, r *http.Request) {
	reset := r.URL.Query().Get("reset") == "1"
	user, sys := cpuTimes()
	g.mu.Lock()
	window := time.Since(g.windowStart).Seconds()
	cpu0 := g.cpuAtStart
	if reset {
		g.windowStart = time.Now()
		g.cpuAtStart = [2]float64{user, sys}
	}
	batches := append([]*batch(nil), g.batches...)
	g.mu.Unlock()
	take := func(a *atomic.Uint64) uint64 {
		if reset {
			return a.Swap(0)
		}
		return a.Load()
	}
	g.errMu.Lock()
	lastErr := g.lastErr
	statuses := map[string]uint64{}
	for k, v := range g.statuses {
		statuses[k] = v
	}
	if reset {
		g.statuses = nil
	}
	g.errMu.Unlock()
	out := map[string]any{
		"mode":           g.mode,
		"now_unix":       float64(time.Now().UnixMicro()) / 1e6,
		"window_s":       window,
		"connected":      g.connected.Load(),
		"connect_fail":   take(&g.connectFail),
		"disconnects":    take(&g.disconnects),
		"drops":          take(&g.drops),
		"ended":          take(&g.ended),
		"events":         take(&g.events),
		"bytes":          take(&g.bytes),
		"comments":       take(&g.comments),
		"pings":          take(&g.pings),
		"control":        take(&g.control),
		"resets":         take(&g.resets),
		"recovered":      take(&g.recovered),
		"recover_failed": take(&g.recoverFailed),
		"gaps":           take(&g.gaps),
		"dups":           take(&g.dups),
		"parse_errors":   take(&g.parseErrors),
		"latency_us":     g.lat.snapshot(reset),
		"cpu_user_s":     user,
		"cpu_sys_s":      sys,
		"window_cpu_s":   user + sys - cpu0[0] - cpu0[1],
		"rss_kb":         rssKB(),
		"goroutines":     runtime.NumGoroutine(),
		"last_error":     lastErr,
		"http_errors":    statuses,
		"gomaxprocs":     runtime.GOMAXPROCS(0),
		"sources":        len(g.sources),
	}
	if bq := r.URL.Query().Get("batch"); bq != "" {
		id, err := strconv.Atoi(bq)
		if err == nil && id >= 0 && id < len(batches) {
			out["batch"] = g.batchStats(batches[id], r.URL.Query().Get("expect_last"))
		}
	}
	writeJSON(w, out)
}

func (g *gen) handleClose(w http.ResponseWriter, _ *http.Request) {
	g.mu.Lock()
	conns := g.conns
	g.conns = nil
	g.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	writeJSON(w, map[string]any{"closed": len(conns)})
}

func main() {
	control := flag.String("control", "127.0.0.1:0", "control API address (loopback)")
	target := flag.String("target", "127.0.0.1:9011", "server host:port")
	path := flag.String("path", "/crm-events", "SSE path (crm) or /connection/uni_sse (cf)")
	mode := flag.String("mode", "crm", "crm (crm-events edge) or cf (Centrifugo uni_sse)")
	channel := flag.String("channel", "bench", "Centrifugo channel")
	sources := flag.Int("sources", 8, "loopback source addresses 127.0.0.2.. to spread ports over")
	procs := flag.Int("procs", 1, "GOMAXPROCS")
	nofile := flag.Uint64("nofile", 65536, "RLIMIT_NOFILE to ask for")
	flag.Parse()
	if *mode != "crm" && *mode != "cf" {
		log.Fatalf("unknown mode %q", *mode)
	}
	runtime.GOMAXPROCS(*procs)
	got := raiseNofile(*nofile)
	g := &gen{mode: *mode, target: *target, path: *path, channel: *channel, windowStart: time.Now()}
	// From the environment, not a flag: a token in argv is readable by every local user.
	if token := os.Getenv("LOADGEN_BEARER"); token != "" {
		g.authHeader = "Authorization: Bearer " + token + "\r\n"
	}
	for i := 0; i < *sources; i++ {
		g.sources = append(g.sources, net.IPv4(127, 0, 0, byte(2+i)))
	}
	u, s := cpuTimes()
	g.cpuAtStart = [2]float64{u, s}

	ln, err := net.Listen("tcp", *control)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, "ok") })
	mux.HandleFunc("/connect", g.handleConnect)
	mux.HandleFunc("/stats", g.handleStats)
	mux.HandleFunc("/close", g.handleClose)
	mux.HandleFunc("/quit", func(w http.ResponseWriter, _ *http.Request) {
		g.stopping.Store(true)
		writeJSON(w, "bye")
		go func() { time.Sleep(50 * time.Millisecond); os.Exit(0) }()
	})
	fmt.Printf("loadgen mode=%s target=%s control=%s nofile=%d procs=%d\n",
		*mode, *target, ln.Addr(), got, *procs)
	log.Fatal(http.Serve(ln, mux))
}
