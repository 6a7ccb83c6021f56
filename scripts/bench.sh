#!/usr/bin/env bash
# Benchmarks (not tests): builds noid-bench and runs it as root from the repo.
#   scripts/bench.sh                      default, core, checkpoint, golden, network
#   scripts/bench.sh --only default -v    one section, logging every run
#   scripts/bench.sh load                 issue 6: 50 clients for 2 minutes
#   scripts/bench.sh --json out.json      also write the figures as JSON
#   scripts/bench.sh report --update BENCHMARKS.md   regenerate its tables from bench/results/ (no root)
# noid-bench builds noid-server, noid-agent and the images into
# $NOID_BENCH_CACHE (default /var/tmp/noid-bench-cache), starts its own
# servers on temporary data dirs and removes everything it started.
# Results, their JSON (bench/results/) and the exact commands are in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
if [ "${1:-}" != report ] && [ "$(id -u)" != 0 ]; then
	echo "bench.sh: run as root (VMs, loop mounts, network namespaces)" >&2
	exit 2
fi
bin=$(mktemp -d /tmp/noid-bench-bin.XXXXXX)
trap 'rm -rf "$bin"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$bin/noid-bench" ./cmd/noid-bench
"$bin/noid-bench" "$@"
