package vmm

// rdtsc returns the CPU's time-stamp counter.
func rdtsc() uint64

const haveRDTSC = true
