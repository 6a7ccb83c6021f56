// Package bench is noid-bench: it measures noid on the host it runs on and
// prints each figure next to the target of its issue and the comparison
// anchor of DESIGN.md §3.
//
// Benchmarks are not timed tests. Every figure comes from real VMs under a
// real noid-server (a subprocess of the freshly built binary, on a temporary
// data dir), and where a target is a comparison (golden against cold, 2 GiB
// against 256 MiB) both sides are measured in the same run, interleaved, so a
// noisy shared host affects both alike. The host's load average is printed
// with every section.
//
// Sections: default (issue 12: the default Debian image and config, and
// QEMU's own ways on the same guest), core (issue 2), checkpoint (issue 3),
// golden (issue 4), network (issue 5), the last four on the tiny image.
// `noid-bench load` is the concurrent load run of issue 6, and
// `noid-bench report` renders --json files as the tables of BENCHMARKS.md.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/vmm"
)

// Options configure a benchmark run.
type Options struct {
	Only        map[string]bool
	Storages    []string // copy, reflink
	CoreRuns    int
	ExecRuns    int
	CkptRuns    int
	RestoreRuns int
	CloneRuns   int
	Clones      int
	GoldenRuns  int
	NetRuns     int
	Warmup      int
	JSON        string // path, or "-" for stdout instead of the text report
	Keep        bool
	Cache       string
	Repo        string
	TempDir     string
	Accel       string
	Verbose     bool
	PoolSpares  int
	// QEMU is the qemu-system-x86_64 binary (qemu_binary of every server,
	// and the peers'); "" finds it in $PATH.
	QEMU string

	// The default section (issue 12).
	DefaultStorages    []string
	DefaultRuns        int
	DefaultRestoreRuns int
	RewriteSeconds     int
	PeerRuns           int
	NoPeers            bool
	// SyncBetweenCheckpoints flushes the host's page cache between the
	// default section's checkpoints.
	SyncBetweenCheckpoints bool

	// The remote section (issue 13): runs, and the image ("debian" or
	// "tiny").
	RemoteRuns  int
	RemoteImage string

	Load LoadOptions

	logw io.Writer
}

func (o *Options) logf(format string, a ...any) {
	if o.logw != nil {
		fmt.Fprintf(o.logw, "# "+format+"\n", a...)
	}
}

// Bench is one run.
type Bench struct {
	opts    *Options
	cmdline string
	art     *Artifacts
	out     io.Writer
	host    *HostInfo
	code    *CodeInfo

	mu       sync.Mutex
	figs     []*Figure
	sections []*SectionInfo
	cleanups []cleanup
	errs     []string
	load     *LoadReport
	// pending is the last figure added, not printed yet (see add).
	pending *Figure
}

type cleanup struct {
	what string
	fn   func() error
}

func (b *Bench) addCleanup(what string, fn func() error) {
	b.mu.Lock()
	b.cleanups = append(b.cleanups, cleanup{what, fn})
	b.mu.Unlock()
}

// runCleanups runs every registered clean-up, newest first.
func (b *Bench) runCleanups() {
	b.mu.Lock()
	cs := b.cleanups
	b.cleanups = nil
	b.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		if err := cs[i].fn(); err != nil {
			b.logf("clean-up of %s: %v", cs[i].what, err)
		}
	}
}

func (b *Bench) logf(format string, a ...any) { b.opts.logf(format, a...) }

func (b *Bench) failf(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	b.mu.Lock()
	b.errs = append(b.errs, msg)
	b.mu.Unlock()
	b.logf("ERROR: %s", msg)
}

var allSections = []string{"default", "core", "checkpoint", "golden", "network", "remote"}

const usage = `noid-bench measures noid on this host (run as root, from the noid source tree).

Usage:
  noid-bench [flags]          default, core, checkpoint, golden, network and remote sections
  noid-bench load [flags]     50 concurrent clients for 2 minutes (issue 6)
  noid-bench report FILE.json...       the figures of --json files as Markdown tables
  noid-bench report --update FILE.md   regenerate the marked tables of FILE.md

It builds noid-server, noid-agent, the tiny image and (for the default
section) the default Debian image into --cache, starts its own noid-servers on
temporary data dirs (the network and default sections inside network
namespaces it creates), and removes every VM, server, QEMU, loop mount and
namespace it started, also on Ctrl-C.

The default section (issue 12) uses the default Debian image and the server's
default configuration (1 vCPU, 2048 MiB, networking on) on each
--default-storage kind, then runs QEMU's own ways (savevm/loadvm, migrate to a
file) on the same guest and prints noid / QEMU ratios.

Flags:
`

// Main runs noid-bench with args and returns the exit code.
func Main(args []string) int {
	if len(args) > 0 && args[0] == "report" {
		return reportMain(args[1:], os.Stdout, os.Stderr)
	}
	o := &Options{logw: os.Stderr}
	load := len(args) > 0 && args[0] == "load"
	if load {
		args = args[1:]
	}
	fs := flag.NewFlagSet("noid-bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	only := fs.String("only", strings.Join(allSections, ","), "sections to run: "+strings.Join(allSections, ","))
	storages := fs.String("storage", "copy,reflink", "storage kinds for the checkpoint and golden sections: copy (plain ext4 data dir), reflink (loop-mounted XFS)")
	fs.IntVar(&o.CoreRuns, "core-runs", 7, "cold create → first exec runs (issue 2 asks ≥ 5)")
	fs.IntVar(&o.ExecRuns, "exec-runs", 100, "exec round trips of `true` (issue 2 asks ≥ 50)")
	fs.IntVar(&o.CkptRuns, "checkpoint-runs", 3, "checkpoints per VM size")
	fs.IntVar(&o.RestoreRuns, "restore-runs", 10, "rewind → first exec runs (issue 3 asks ≥ 10)")
	fs.IntVar(&o.CloneRuns, "clone-runs", 10, "clone → first exec runs (issue 3 asks ≥ 10)")
	fs.IntVar(&o.Clones, "clones", 20, "clones kept alive at once from one checkpoint for the memory figure")
	fs.IntVar(&o.GoldenRuns, "golden-runs", 10, "golden and cold create → first exec runs each (issue 4 asks ≥ 10)")
	fs.IntVar(&o.NetRuns, "net-runs", 10, "network create and clone runs")
	fs.IntVar(&o.Warmup, "warmup", 1, "unrecorded warm-up runs before each timed series")
	fs.StringVar(&o.JSON, "json", "", "also write the figures as JSON to this file (\"-\": JSON on stdout instead of the text report)")
	fs.BoolVar(&o.Keep, "keep", false, "keep the temporary data dirs (for debugging)")
	fs.StringVar(&o.Cache, "cache", envOr("NOID_BENCH_CACHE", "/var/tmp/noid-bench-cache"), "where built binaries and the tiny image are cached")
	fs.StringVar(&o.Repo, "repo", "", "the noid source tree (default: found above the current directory)")
	fs.StringVar(&o.TempDir, "tmp", os.TempDir(), "parent of the temporary data dirs (its filesystem is the \"copy\" storage)")
	fs.StringVar(&o.Accel, "accel", "auto", "auto, kvm or tcg")
	fs.BoolVar(&o.Verbose, "v", false, "log every run")
	fs.IntVar(&o.PoolSpares, "pool-spares", -1, "set [pool] spares on every server (-1: the server's default)")
	fs.StringVar(&o.QEMU, "qemu", "", "qemu-system-x86_64 binary for every server (qemu_binary) and for QEMU's own ways; qemu-img is taken from its directory when there is one (default: $PATH)")
	defStorages := fs.String("default-storage", "default,reflink", "storage kinds of the default section: default (the server's default config on --tmp), copy (the same with plain copies asked for explicitly: identical on ext4 today), reflink (loop-mounted XFS)")
	fs.IntVar(&o.DefaultRuns, "default-runs", 5, "default section: checkpoints per touch level")
	fs.IntVar(&o.DefaultRestoreRuns, "default-restore-runs", 10, "default section: rewinds and clones per series")
	fs.IntVar(&o.RewriteSeconds, "rewrite-seconds", 60, "default section: how long a guest rewrites 200 MiB of its RAM while host disk writes are counted (0: skip)")
	fs.IntVar(&o.PeerRuns, "peer-runs", 5, "default section: runs of each of QEMU's own ways (savevm/loadvm, migrate to a file)")
	fs.BoolVar(&o.NoPeers, "no-peers", false, "default section: skip QEMU's own ways and the comparison")
	fs.BoolVar(&o.SyncBetweenCheckpoints, "sync-between-checkpoints", true, "default section: flush the host's page cache (sync) between checkpoints, so that a pause does not wait behind the write-back of the previous checkpoint's spare")
	fs.IntVar(&o.RemoteRuns, "remote-runs", 3, "remote section: push/clone rounds per VM (idle, 512 MiB touched)")
	fs.StringVar(&o.RemoteImage, "remote-image", "debian", "remote section: the image of its VMs: debian (the default image, 2048 MiB) or tiny (512 MiB, for a quick check)")
	o.Load.flags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "noid-bench: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	o.Only = map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !contains(allSections, s) {
			fmt.Fprintf(os.Stderr, "noid-bench: unknown section %q (have %s)\n", s, strings.Join(allSections, ", "))
			return 2
		}
		o.Only[s] = true
	}
	if load {
		// The load run uses the tiny image only: no default image to build.
		o.Only = map[string]bool{}
	}
	for _, s := range strings.Split(*storages, ",") {
		s = strings.TrimSpace(s)
		if s != "copy" && s != "reflink" {
			fmt.Fprintf(os.Stderr, "noid-bench: unknown storage %q (copy, reflink)\n", s)
			return 2
		}
		o.Storages = append(o.Storages, s)
	}
	for _, s := range strings.Split(*defStorages, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue // none: only QEMU's own ways
		}
		if !contains(defaultStorageKinds, s) {
			fmt.Fprintf(os.Stderr, "noid-bench: unknown default-section storage %q (%s)\n", s, strings.Join(defaultStorageKinds, ", "))
			return 2
		}
		o.DefaultStorages = append(o.DefaultStorages, s)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "noid-bench: run as root (it starts VMs, loop mounts and network namespaces)")
		return 2
	}
	kvm := vmm.ProbeKVM()
	accel, warn, err := vmm.ResolveAccel(vmm.Accel(o.Accel), kvm)
	if err != nil {
		fmt.Fprintln(os.Stderr, "noid-bench:", err)
		return 2
	}
	if warn != "" {
		o.logf("%s", warn)
	}
	o.Accel = string(accel)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigc
		o.logf("got %v: stopping and cleaning up (again to abort the clean-up)", s)
		cancel()
		<-sigc
		os.Exit(130)
	}()

	out := io.Writer(os.Stdout)
	if o.JSON == "-" {
		out = io.Discard
	}
	b := &Bench{opts: o, out: out, cmdline: strings.TrimSpace("noid-bench " + strings.Join(os.Args[1:], " "))}
	defer b.runCleanups()
	if o.QEMU != "" {
		abs, err := filepath.Abs(o.QEMU)
		if err != nil {
			fmt.Fprintln(os.Stderr, "noid-bench:", err)
			return 2
		}
		o.QEMU = abs
	}
	b.host = hostInfo(o.Accel, o.qemuBinary())
	root, err := repoRoot(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "noid-bench:", err)
		return 2
	}
	o.Repo = root
	b.code = gitInfo(root)
	b.printHeader(load)
	art, err := buildArtifacts(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "noid-bench:", err)
		return 1
	}
	b.art = art
	if load {
		err = b.runLoad(ctx)
	} else {
		err = b.runSections(ctx)
	}
	b.runCleanups()
	if err != nil {
		b.failf("%v", err)
	}
	b.printSummary()
	if o.JSON != "" {
		if jerr := b.writeJSON(); jerr != nil {
			fmt.Fprintln(os.Stderr, "noid-bench: writing JSON:", jerr)
			return 1
		}
	}
	if len(b.errs) > 0 {
		return 1
	}
	return 0
}

func (b *Bench) runSections(ctx context.Context) error {
	type sec struct {
		name string
		fn   func(context.Context) error
	}
	for _, s := range []sec{{"default", b.runDefault}, {"core", b.runCore}, {"checkpoint", b.runCheckpoint}, {"golden", b.runGolden}, {"network", b.runNetwork}, {"remote", b.runRemote}} {
		if !b.opts.Only[s.name] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.fn(ctx); err != nil {
			b.failf("section %s: %v", s.name, err)
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
		b.runCleanups()
	}
	return nil
}

// qemuBinary is --qemu, or qemu-system-x86_64 from $PATH.
func (o *Options) qemuBinary() string {
	if o.QEMU != "" {
		return o.QEMU
	}
	return "qemu-system-x86_64"
}

// qemuImg is the qemu-img next to --qemu, or the one in $PATH.
func (o *Options) qemuImg() string {
	if o.QEMU != "" {
		if p := filepath.Join(filepath.Dir(o.QEMU), "qemu-img"); fileExists(p) {
			return p
		}
	}
	return "qemu-img"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// JSONReport is what --json writes.
type JSONReport struct {
	Command string `json:"command"`
	// Code is the commit noid-bench built noid from, and whether the tree
	// was modified.
	Code     *CodeInfo      `json:"code,omitempty"`
	Host     *HostInfo      `json:"host"`
	Finished time.Time      `json:"finished"`
	Sections []*SectionInfo `json:"sections"`
	Figures  []*Figure      `json:"figures"`
	Errors   []string       `json:"errors,omitempty"`
	Load     *LoadReport    `json:"load,omitempty"`
}

func (b *Bench) writeJSON() error {
	r := JSONReport{Command: b.cmdline, Code: b.code, Host: b.host, Finished: time.Now(), Sections: b.sections, Figures: b.figs, Errors: b.errs, Load: b.load}
	buf, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	buf = append(buf, '\n')
	if b.opts.JSON == "-" {
		_, err = os.Stdout.Write(buf)
		return err
	}
	if err := os.MkdirAll(filepath.Dir(b.opts.JSON), 0o755); err != nil {
		return err
	}
	return os.WriteFile(b.opts.JSON, buf, 0o644)
}

// SectionInfo records when a section ran and how loaded the host was.
type SectionInfo struct {
	Name      string     `json:"name"`
	Start     time.Time  `json:"start"`
	Seconds   float64    `json:"seconds"`
	LoadStart [3]float64 `json:"loadavg_start"`
	LoadEnd   [3]float64 `json:"loadavg_end"`
	OtherQEMU int        `json:"other_qemu_processes"`
}

// section prints a section header and returns a func that closes it.
func (b *Bench) section(name, title string) func() {
	si := &SectionInfo{Name: name, Start: time.Now(), LoadStart: loadAvg(), OtherQEMU: otherQEMU()}
	b.mu.Lock()
	b.sections = append(b.sections, si)
	b.mu.Unlock()
	b.flushFigures()
	fmt.Fprintf(b.out, "\n== %s ==\n", title)
	fmt.Fprintf(b.out, "   load average at start %.2f %.2f %.2f; other QEMU processes on the host: %d\n", si.LoadStart[0], si.LoadStart[1], si.LoadStart[2], si.OtherQEMU)
	return func() {
		b.flushFigures()
		si.Seconds = time.Since(si.Start).Seconds()
		si.LoadEnd = loadAvg()
		fmt.Fprintf(b.out, "   (section took %.0fs; load average at end %.2f %.2f %.2f)\n", si.Seconds, si.LoadEnd[0], si.LoadEnd[1], si.LoadEnd[2])
	}
}

func sortedKeys[M ~map[string]V, V any](m M) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}
