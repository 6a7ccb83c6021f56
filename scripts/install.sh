#!/usr/bin/env bash
# Installs noid on a Debian or Ubuntu host: the noid, noid-server and
# noid-agent binaries, the systemd unit, a default /etc/noid/config.toml
# (never overwriting one that exists, nor added next to the Rust noid's
# /etc/noid/server.toml) and shell completions. Idempotent:
# running it again only replaces what changed, which is also how to upgrade
# (VMs keep running across `systemctl restart noid-server`).
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--from DIR] [--no-start]
#   scripts/install.sh --uninstall [--prefix DIR] [--destdir DIR]
#
# --uninstall removes everything it installed except user data: the data dir
# /var/lib/noid (VMs, checkpoints, images, the database) is kept, and so is a
# config file that was changed after installation.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local
destdir=${DESTDIR:-}
from=""
uninstall=0
start=1

usage() {
	cat <<EOF
usage: $0 [options]

Installs noid (binaries, systemd unit, default config, shell completions).

  --prefix DIR    install binaries in DIR/bin and completions in DIR/share (default /usr/local)
  --destdir DIR   stage everything below DIR instead of / (also: DESTDIR=DIR); no systemctl
  --from DIR      take noid, noid-server and noid-agent from DIR (default: $repo/bin,
                  built with \`make build\` if missing)
  --no-start      do not enable or (re)start the noid-server service
  --uninstall     remove what was installed; keeps /var/lib/noid and a changed config
  -h, --help      this help
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
	case $1 in
	--prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix=$2; shift 2 ;;
	--prefix=*) prefix=${1#*=}; shift ;;
	--destdir | --root) [ $# -ge 2 ] || { usage >&2; exit 2; }; destdir=$2; shift 2 ;;
	--destdir=* | --root=*) destdir=${1#*=}; shift ;;
	--from) [ $# -ge 2 ] || { usage >&2; exit 2; }; from=$2; shift 2 ;;
	--from=*) from=${1#*=}; shift ;;
	--no-start) start=0; shift ;;
	--uninstall) uninstall=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
	esac
done

case $prefix in
/*) ;;
*) die "--prefix must be an absolute path, got $prefix" ;;
esac
prefix=${prefix%/}
if [ -n "$destdir" ]; then
	mkdir -p "$destdir"
	destdir=$(cd "$destdir" && pwd)
	if [ "$destdir" = / ]; then destdir=""; fi
fi

bindir=$prefix/bin
unit=/etc/systemd/system/noid-server.service
confdir=/etc/noid
conf=$confdir/config.toml
datadir=/var/lib/noid
bash_comp=$prefix/share/bash-completion/completions/noid
zsh_comp=$prefix/share/zsh/site-functions/_noid
fish_comp=$prefix/share/fish/vendor_completions.d/noid.fish
binaries=(noid noid-server noid-agent)

# systemd is only touched on a live install on a host that runs it.
use_systemd=0
if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	use_systemd=1
fi

if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
	die "run as root (it writes $bindir, /etc and $datadir), or stage it with --destdir DIR"
fi

# put SRC DST MODE: installs SRC as DST unless DST already has that content.
put() {
	local src=$1 dst=$destdir$2 mode=$3
	if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
		chmod "$mode" "$dst"
		echo "unchanged $2"
		return
	fi
	install -D -m "$mode" "$src" "$dst"
	echo "installed $2"
}

# remove PATH: removes an installed file if it is there.
remove() {
	if [ -e "$destdir$1" ] || [ -L "$destdir$1" ]; then
		rm -f "$destdir$1"
		echo "removed $1"
	fi
}

if [ $uninstall = 1 ]; then
	if [ $use_systemd = 1 ] && [ -f "$unit" ]; then
		systemctl disable --now noid-server.service >/dev/null 2>&1 || true
		echo "stopped and disabled noid-server (VMs it started keep running; destroy them first to stop them)"
	fi
	for b in "${binaries[@]}"; do remove "$bindir/$b"; done
	remove "$unit"
	remove "$bash_comp"
	remove "$zsh_comp"
	remove "$fish_comp"
	if [ -f "$destdir$conf" ]; then
		if cmp -s "$repo/deploy/config.toml" "$destdir$conf"; then
			remove "$conf"
		else
			echo "kept $conf: it was changed after installation (remove it yourself if you do not need it)"
		fi
	fi
	rmdir "$destdir$confdir" 2>/dev/null || true
	# Completion directories this may have created, only when left empty.
	for d in share/bash-completion/completions share/bash-completion share/zsh/site-functions share/zsh \
		share/fish/vendor_completions.d share/fish; do
		rmdir "$destdir$prefix/$d" 2>/dev/null || true
	done
	if [ $use_systemd = 1 ]; then systemctl daemon-reload || true; fi
	if [ -d "$destdir$datadir" ]; then
		echo "kept $datadir (user data: VMs, checkpoints, images and the database)"
	fi
	echo "noid uninstalled"
	exit 0
fi

# Binaries: --from, else bin/ of this checkout (built if missing).
if [ -z "$from" ]; then
	from=$repo/bin
	missing=0
	for b in "${binaries[@]}"; do [ -x "$from/$b" ] || missing=1; done
	if [ $missing = 1 ]; then
		export PATH=/usr/local/go/bin:$PATH
		command -v go >/dev/null 2>&1 || die "no binaries in $from and no Go to build them; run scripts/setup.sh (or make build) first"
		echo "building noid (make build)"
		make -s -C "$repo" build
	fi
fi
for b in "${binaries[@]}"; do
	[ -x "$from/$b" ] || die "$from/$b is missing or not executable; build with \`make build\`, or point --from at the binaries"
done

if [ -z "$destdir" ] && [ -r /etc/os-release ]; then
	# shellcheck disable=SC1091
	. /etc/os-release
	case " ${ID:-} ${ID_LIKE:-} " in
	*" debian "* | *" ubuntu "*) ;;
	*) echo "warning: this installer is made for Debian and Ubuntu; ${PRETTY_NAME:-this system} may need other steps" >&2 ;;
	esac
fi

for b in "${binaries[@]}"; do put "$from/$b" "$bindir/$b" 0755; done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/noid-server#$bindir/noid-server#g" "$repo/deploy/noid-server.service" >"$tmp/noid-server.service"
put "$tmp/noid-server.service" "$unit" 0644

legacy_conf=$confdir/server.toml
if [ -e "$destdir$conf" ]; then
	echo "kept existing $conf"
elif [ -e "$destdir$legacy_conf" ]; then
	# A host set up for the Rust noid: noid-server reads its server.toml
	# (with a deprecation warning per old key) while config.toml is absent.
	echo "kept the Rust noid's $legacy_conf and installed no $conf: noid-server reads it while $conf does not exist (see docs/server-guide.md)"
else
	put "$repo/deploy/config.toml" "$conf" 0644
fi
install -d -m 0755 "$destdir$confdir"
install -d -m 0700 "$destdir$datadir"

"$from/noid" completion bash >"$tmp/noid.bash"
"$from/noid" completion zsh >"$tmp/_noid"
"$from/noid" completion fish >"$tmp/noid.fish"
put "$tmp/noid.bash" "$bash_comp" 0644
put "$tmp/_noid" "$zsh_comp" 0644
put "$tmp/noid.fish" "$fish_comp" 0644

if [ $use_systemd = 1 ]; then
	systemctl daemon-reload
	if [ $start = 1 ]; then
		systemctl enable noid-server.service >/dev/null 2>&1
		if systemctl is-active --quiet noid-server.service; then
			systemctl restart noid-server.service
			echo "restarted noid-server (running VMs are re-adopted)"
		else
			systemctl start noid-server.service
			echo "started noid-server"
		fi
	fi
elif [ -z "$destdir" ]; then
	echo "systemd is not running here: start the server with \`$bindir/noid-server serve --config $conf\`"
fi

if [ -z "$destdir" ]; then
	command -v qemu-system-x86_64 >/dev/null 2>&1 ||
		echo "note: qemu-system-x86_64 is not installed; apt-get install qemu-system-x86 (scripts/setup.sh installs everything)"
	echo "next: build the guest image with \`noid-server image build\`, then \`noid create dev\`"
fi
echo "noid installed in ${destdir:-/} (prefix $prefix)"
