#!/usr/bin/env bash
# Runs every `go test -fuzz` target for a bounded time (default 5s each).
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-5s}
for f in $(grep -rl --include='*_test.go' '^func Fuzz' .); do
	pkg=./$(dirname "${f#./}")
	for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
		echo "fuzz $pkg $target ($t)"
		go test -run='^$' -fuzz="^${target}\$" -fuzztime="$t" "$pkg" >/tmp/noid-fuzz.log 2>&1 || { cat /tmp/noid-fuzz.log; exit 1; }
	done
done
