#!/usr/bin/env bash
# Installs what noid needs on a Debian or Ubuntu host (as root) and builds it.
# Idempotent: re-running only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

GO_VERSION=1.26.8
APT_PACKAGES=(make qemu-system-x86 qemu-utils e2fsprogs debootstrap busybox-static cpio xfsprogs iproute2 ca-certificates curl unzip binutils)

if [ "$(id -u)" != 0 ]; then
	echo "setup.sh: run as root (it installs packages with apt)" >&2
	exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq || true
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go: use the one on PATH or /usr/local/go if new enough, else fetch the
# toolchain from the Go module proxy (the only Go download this needs).
export PATH=/usr/local/go/bin:$PATH
need_go=1
if command -v go >/dev/null 2>&1; then
	have=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
	if [ "$(printf '%s\n%s\n' "1.26" "$have" | sort -V | head -1)" = "1.26" ]; then need_go=0; fi
fi
if [ $need_go = 1 ]; then
	echo "setup: installing Go $GO_VERSION into /usr/local/go (from the Go module proxy)"
	tmp=$(mktemp -d)
	curl -fsSL -o "$tmp/go.zip" "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go${GO_VERSION}.linux-amd64.zip"
	unzip -q "$tmp/go.zip" -d "$tmp"
	rm -rf /usr/local/go
	mv "$tmp/golang.org/toolchain@v0.0.1-go${GO_VERSION}.linux-amd64" /usr/local/go
	chmod +x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/* 2>/dev/null || true
	rm -rf "$tmp"
fi

echo "setup: building noid ($(go version | cut -d' ' -f3))"
make -s build
echo "setup: binaries in $(pwd)/bin"
