#!/usr/bin/env bash
# The whole noid test suite, as root: unit tests, root tests (network
# namespaces, TAP devices, loop devices) and VM end-to-end tests under QEMU.
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH=/usr/local/go/bin:$PATH
export NOID_TEST_CACHE=${NOID_TEST_CACHE:-/var/tmp/noid-test-cache}
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "go vet"
go vet ./...
go vet -tags e2e ./test/... ./client/...

step "unit and root tests"
go test -count=1 -timeout 20m ./...

step "fuzz targets (bounded)"
./scripts/fuzz.sh 5s

step "VM end-to-end tests (QEMU, $(nproc) cores)"
go test -count=1 -tags e2e -timeout 40m -p 1 ./test/e2e/... -v 2>&1 | tee /tmp/noid-e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)' || true
grep -qE '^(FAIL|panic)' /tmp/noid-e2e.log && { echo "e2e tests failed; full log in /tmp/noid-e2e.log"; grep -B30 -E '^--- FAIL' /tmp/noid-e2e.log | tail -120; exit 1; }
grep -q '^ok' /tmp/noid-e2e.log || { echo "e2e tests did not complete"; tail -50 /tmp/noid-e2e.log; exit 1; }

step "Go client examples against a real noid-server (QEMU)"
go test -count=1 -tags e2e -timeout 15m ./client/

step "all tests passed"
