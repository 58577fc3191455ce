package main

import (
	"math/bits"
	"sync/atomic"
)

// A log-linear histogram of non-negative integers (microseconds here): exact below 32, then
// 32 sub-buckets per power of two (relative error under 3.2 %). Lock-free: recording is one
// atomic add, so connection goroutines never contend on a mutex.
const (
	subBits    = 5
	subCount   = 1 << subBits
	maxExp     = 40 // values up to 2^41 us (~25 days): far beyond any run
	histBucket = (maxExp-subBits+2)*subCount + subCount
)

type hist struct {
	counts [histBucket]atomic.Uint64
	n      atomic.Uint64
	sum    atomic.Uint64
	max    atomic.Uint64
}

func bucketOf(v uint64) int {
	if v < subCount {
		return int(v)
	}
	e := 63 - bits.LeadingZeros64(v)
	if e > maxExp {
		e = maxExp
		v = (uint64(1) << (maxExp + 1)) - 1
	}
	sub := (v >> uint(e-subBits)) & (subCount - 1)
	return (e-subBits+1)*subCount + int(sub)
}

// upperOf is the largest value that falls in bucket i (reported for percentiles: conservative).
func upperOf(i int) uint64 {
	if i < subCount {
		return uint64(i)
	}
	e := i/subCount + subBits - 1
	sub := uint64(i % subCount)
	low := (subCount + sub) << uint(e-subBits)
	return low + (uint64(1) << uint(e-subBits)) - 1
}

func (h *hist) record(v uint64) {
	h.counts[bucketOf(v)].Add(1)
	h.n.Add(1)
	h.sum.Add(v)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			return
		}
	}
}

type histSummary struct {
	Count uint64  `json:"count"`
	Mean  float64 `json:"mean"`
	P50   uint64  `json:"p50"`
	P90   uint64  `json:"p90"`
	P95   uint64  `json:"p95"`
	P99   uint64  `json:"p99"`
	P999  uint64  `json:"p999"`
	Max   uint64  `json:"max"`
}

// snapshot summarises the histogram and, with reset, clears it. Records racing with the
// reset land in either window; counts are never lost.
func (h *hist) snapshot(reset bool) histSummary {
	var counts [histBucket]uint64
	var total uint64
	for i := range h.counts {
		var c uint64
		if reset {
			c = h.counts[i].Swap(0)
		} else {
			c = h.counts[i].Load()
		}
		counts[i] = c
		total += c
	}
	var sum, max uint64
	if reset {
		h.n.Swap(0)
		sum = h.sum.Swap(0)
		max = h.max.Swap(0)
	} else {
		sum = h.sum.Load()
		max = h.max.Load()
	}
	s := histSummary{Count: total, Max: max}
	if total == 0 {
		return s
	}
	s.Mean = float64(sum) / float64(total)
	pct := func(p float64) uint64 {
		rank := uint64(p*float64(total) + 0.5)
		if rank < 1 {
			rank = 1
		}
		var acc uint64
		for i, c := range counts {
			acc += c
			if acc >= rank {
				u := upperOf(i)
				if u > max {
					u = max
				}
				return u
			}
		}
		return max
	}
	s.P50, s.P90, s.P95, s.P99, s.P999 = pct(0.50), pct(0.90), pct(0.95), pct(0.99), pct(0.999)
	return s
}
