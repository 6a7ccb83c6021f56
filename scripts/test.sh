#!/usr/bin/env bash
# The whole noid test suite, as root: unit tests, root tests (network
# namespaces, TAP devices, loop devices) and VM end-to-end tests under QEMU.
# .ci/run calls exactly this.
#
# Each `go test` step runs with -json through scripts/testreport, which
# prints one line per package (the e2e and client steps: each test's start
# and result), the whole output of every failing test, and keeps the stream
# and the plain log in a private directory (mktemp). The script ends with
# every skipped test of every step and its reason. The directory is removed
# after a passing run (NOID_TEST_KEEP_LOGS=1 keeps it) and named otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export PATH=/usr/local/go/bin:$PATH
export NOID_TEST_CACHE=${NOID_TEST_CACHE:-/var/tmp/noid-test-cache}
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }
logs=$(mktemp -d /tmp/noid-test.XXXXXX)
report=$logs/testreport
module=$(go list -m)

finish() {
	status=$?
	if [ -x "$report" ]; then
		step "skipped tests"
		"$report" skips -module "$module" unit="$logs/unit.json" e2e="$logs/e2e.json" client="$logs/client.json" || status=1
	fi
	if [ "$status" -eq 0 ]; then
		step "all tests passed"
		[ "${NOID_TEST_KEEP_LOGS:-}" = 1 ] && echo "logs: $logs" || rm -rf "$logs"
	else
		step "FAILED (exit $status); logs of this run: $logs"
	fi
	exit "$status"
}
trap finish EXIT

# gotest STEP [-v] GO-TEST-ARGS...: go test -json, through testreport.
gotest() {
	local name=$1 v=
	shift
	if [ "$1" = -v ]; then v=-v; shift; fi
	go test -json "$@" 2>&1 | "$report" stream $v -module "$module" -json "$logs/$name.json" -log "$logs/$name.log"
}

go build -o "$report" ./scripts/testreport

step "go vet"
go vet ./...
go vet -tags e2e ./test/... ./client/...

step "unit and root tests"
gotest unit -count=1 -timeout 20m ./...

step "fuzz targets (bounded)"
./scripts/fuzz.sh 5s

step "VM end-to-end tests (QEMU, $(nproc) cores)"
gotest e2e -v -count=1 -tags e2e -timeout 40m -p 1 ./test/e2e/...

step "Go client examples against a real noid-server (QEMU)"
gotest client -v -count=1 -tags e2e -timeout 15m ./client/

step "bounded load: 12 clients of 3 users for 30 s, then the consistency and leak checks (noid-bench load)"
./scripts/bench.sh load --clients 12 --users 3 --duration 30s --cache "$NOID_TEST_CACHE/bench" >"$logs/load.log" 2>&1 ||
	{ tail -n 60 "$logs/load.log"; echo "bounded load failed; its log: $logs/load.log"; exit 1; }
grep -E '^  (cycles:|create |rewind |clone )|^    (ok|FAIL) ' "$logs/load.log" || true
