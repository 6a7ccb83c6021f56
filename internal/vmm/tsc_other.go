//go:build !amd64

package vmm

func rdtsc() uint64 { return 0 }

const haveRDTSC = false
