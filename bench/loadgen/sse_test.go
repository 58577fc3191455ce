package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func newConn(mode string, b *batch) *sseConn {
	if b == nil {
		b = &batch{}
	}
	c := &sseConn{g: &gen{mode: mode}, b: b}
	c.cfLast = -1
	c.resetPositions()
	return c
}

func frame(cursor string, partition, offset int) string {
	return fmt.Sprintf("id: %s\ndata: {\"type\":\"T\",\"key\":null,\"partition\":%d,\"offset\":%d,"+
		"\"timestamp_ms\":1,\"event\":{}}\n\n", cursor, partition, offset)
}

func TestCrmSequenceIsCheckedPerPartitionFromTheEnvelope(t *testing.T) {
	c := newConn("crm", nil)
	// Partitions interleave freely; each one's offsets must follow on.
	c.feedSSE([]byte(frame("1.A", 0, 5) + frame("1.B", 1, 9) + frame("1.C", 0, 6) + frame("1.D", 1, 10)))
	if got := c.g.events.Load(); got != 4 {
		t.Fatalf("events = %d, want 4", got)
	}
	if c.g.gaps.Load() != 0 || c.g.dups.Load() != 0 {
		t.Fatalf("gaps %d dups %d, want none", c.g.gaps.Load(), c.g.dups.Load())
	}
	// A repeat in partition 1 is a duplicate and dropped; a jump in partition 0 counts the
	// missing offsets.
	c.feedSSE([]byte(frame("1.E", 1, 10) + frame("1.F", 0, 9)))
	if c.g.dups.Load() != 1 || c.g.gaps.Load() != 2 || c.g.events.Load() != 5 {
		t.Fatalf("dups %d gaps %d events %d, want 1, 2, 5",
			c.g.dups.Load(), c.g.gaps.Load(), c.g.events.Load())
	}
	// The cursor is kept as it came, even from the dropped duplicate's frame.
	if string(c.lastID) != "1.F" || !c.hasLast {
		t.Fatalf("last cursor %q", c.lastID)
	}
	if !c.reached([]int64{9, 10}) || c.reached([]int64{9, 11}) {
		t.Fatal("reached() does not compare per-partition offsets")
	}
}

func TestCursorIsOpaqueAndResumedUnchanged(t *testing.T) {
	cursor := "1.AAAAAQMB_-x" + strings.Repeat("A", 300)
	c := newConn("crm", &batch{lei: "1.start", leiParts: parseOffsets("4,-,7")})
	c.lastID = []byte(c.b.lei)
	c.hasLast = true
	for p, off := range c.b.leiParts {
		c.partLast[p].Store(off)
	}
	// The first event after the resume is checked against what the cursor covered.
	c.feedSSE([]byte(frame(cursor, 0, 6) + frame(cursor+"x", 2, 8) + frame(cursor+"y", 1, 0)))
	if c.g.gaps.Load() != 1 || c.g.events.Load() != 3 {
		t.Fatalf("gaps %d events %d, want 1 and 3", c.g.gaps.Load(), c.g.events.Load())
	}
	if string(c.lastID) != cursor+"y" {
		t.Fatalf("last cursor %q", c.lastID)
	}
	// A reset moves the position to its id and restarts every partition's check.
	c.feedSSE([]byte("id: 1.reset\nevent: reset\ndata: {\"reason\":\"trimmed\"}\n\n" + frame("1.G", 0, 100)))
	if c.g.resets.Load() != 1 || c.g.gaps.Load() != 1 || string(c.lastID) != "1.G" {
		t.Fatalf("resets %d gaps %d last %q", c.g.resets.Load(), c.g.gaps.Load(), c.lastID)
	}
	if c.g.parseErrors.Load() != 0 {
		t.Fatalf("parse errors %d", c.g.parseErrors.Load())
	}
}

func TestParseOffsets(t *testing.T) {
	got := parseOffsets("17,-,4")
	if len(got) != 3 || got[0] != 17 || got[1] != -1 || got[2] != 4 {
		t.Fatalf("parseOffsets = %v", got)
	}
	for _, bad := range []string{"", "a", "1,,2", "-2"} {
		if parseOffsets(bad) != nil {
			t.Fatalf("parseOffsets(%q) accepted", bad)
		}
	}
}

// The per-event path allocates nothing once the connection's buffers have grown.
func TestEventPathDoesNotAllocate(t *testing.T) {
	c := newConn("crm", &batch{latency: true})
	cursor := "1.AAAAAQMB" + strings.Repeat("B", 40)
	off := 0
	events := make([][]byte, 64)
	for i := range events {
		events[i] = []byte(frame(cursor, 1, i))
	}
	c.feedSSE(events[0])
	allocs := testing.AllocsPerRun(200, func() {
		off++
		c.feedSSE(events[off%len(events)])
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per event, want 0", allocs)
	}
}

// A batch's lifetime: 0 when unset, else uniform within [lifeMin, lifeMax] (both reached).
func TestBatchLifetimeStaysInItsRange(t *testing.T) {
	if d := (&batch{}).lifetime(); d != 0 {
		t.Fatalf("no lifetime set: got %v, want 0", d)
	}
	b := &batch{lifeMin: 60 * time.Second, lifeMax: 240 * time.Second}
	lo, hi := b.lifeMax, b.lifeMin
	for i := 0; i < 20000; i++ {
		d := b.lifetime()
		if d < b.lifeMin || d > b.lifeMax {
			t.Fatalf("lifetime %v outside [%v, %v]", d, b.lifeMin, b.lifeMax)
		}
		lo, hi = min(lo, d), max(hi, d)
	}
	if lo > 61*time.Second || hi < 239*time.Second {
		t.Fatalf("lifetimes do not spread over the range: %v..%v", lo, hi)
	}
	fixed := &batch{lifeMin: time.Second, lifeMax: time.Second}
	if d := fixed.lifetime(); d != time.Second {
		t.Fatalf("min == max: got %v", d)
	}
}
