#!/usr/bin/env bash
# Installs what noid needs on a Debian or Ubuntu host (as root) and builds it.
# --test also builds what only the test suite needs (an S3 server).
# Idempotent: re-running only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

GO_VERSION=1.26.8
APT_PACKAGES=(make qemu-system-x86 qemu-utils e2fsprogs debootstrap busybox-static cpio xfsprogs iproute2 ca-certificates curl unzip binutils)

with_test_tools=0
for a in "$@"; do
	case $a in
	--test) with_test_tools=1 ;;
	*) echo "setup.sh: unknown argument $a (usage: setup.sh [--test])" >&2; exit 2 ;;
	esac
done

if [ "$(id -u)" != 0 ]; then
	echo "setup.sh: run as root (it installs packages with apt)" >&2
	exit 1
fi

# QEMU 9.0 or later: with TCG (no usable KVM), earlier QEMUs lose some of the
# pages a guest writes during a live migration, so noid's live checkpoints
# need it (older ones make checkpoints that stop the guest for the whole RAM
# copy). Debian 12 ships 7.2; its backports have 10.0, which this installs.
. /etc/os-release 2>/dev/null || true
qemu_from=()
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
	bpo=/etc/apt/sources.list.d/noid-bookworm-backports.list
	if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo "setup: adding bookworm-backports (for QEMU 10) in $bpo"
		echo "deb http://deb.debian.org/debian bookworm-backports main" >"$bpo"
		apt-get update -qq || true
	fi
	qemu_from=(-t bookworm-backports)
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

qemu_version() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
if [ ${#qemu_from[@]} -gt 0 ] && [ "$(qemu_version)" != "" ] && [ "$(qemu_version)" -lt 9 ]; then
	echo "setup: upgrading QEMU to the bookworm-backports version"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" qemu-system-x86 qemu-utils >/dev/null ||
		echo "setup: warning: QEMU from bookworm-backports could not be installed; checkpoints stop the guest for the whole RAM copy under TCG" >&2
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

# With --test (scripts/test.sh passes it): a real S3-compatible server for
# the remote-store tests (issue 13): versitygw, built from its Go module once
# and kept in /usr/local/bin. The tests start it themselves, on loopback,
# serving a temporary directory. A plain install does not need it.
VERSITYGW_VERSION=v1.8.0
stamp=/usr/local/share/noid/versitygw.version
if [ "$with_test_tools" = 1 ] && { [ ! -x /usr/local/bin/versitygw ] || [ "$(cat "$stamp" 2>/dev/null)" != "$VERSITYGW_VERSION" ]; }; then
	echo "setup: building versitygw $VERSITYGW_VERSION (S3 server for the tests) into /usr/local/bin (about a minute)"
	GOBIN=/usr/local/bin go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
	mkdir -p "$(dirname "$stamp")"
	echo "$VERSITYGW_VERSION" >"$stamp"
fi

echo "setup: building noid ($(go version | cut -d' ' -f3))"
make -s build
echo "setup: binaries in $(pwd)/bin"
