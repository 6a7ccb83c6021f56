#!/usr/bin/env bash
# noid's main job in one command, on a fresh Debian or Ubuntu host, as root:
# install what noid needs, build it, build the default guest image and a
# golden snapshot, start noid-server, create a VM and run a command in it.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

VM=${NOID_DEMO_VM:-demo}
CONFIG=/etc/noid/config.toml
say() { printf '\n==> %s\n' "$*"; }

say "installing dependencies and building noid"
./scripts/setup.sh
./scripts/install.sh >/dev/null
export PATH=/usr/local/bin:$PATH

# From here on, a failing step ends with what `noid-server doctor` finds
# wrong with the host (KVM, QEMU, the data dir, storage, cgroups, network).
doctor() {
	echo "quickstart: checking the host with \`noid-server doctor --config $CONFIG\`:" >&2
	noid-server doctor --config "$CONFIG" >&2 || true
}
trap 'status=$?; echo "quickstart: a step failed (exit $status)" >&2; doctor; exit $status' ERR

say "building the guest image (Debian bookworm; the first build takes a few minutes)"
noid-server image build --config "$CONFIG"

say "starting noid-server"
up() { noid version 2>/dev/null | grep -q '^server: noid-server'; }
LOG=/var/log/noid-server.log
PIDFILE=/run/noid-server.pid
pid=""
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
	systemd=1
	systemctl daemon-reload
	systemctl enable noid-server >/dev/null 2>&1 || true
	systemctl restart noid-server
else
	# No systemd (a container, say): run it in the background. One started by
	# an earlier run is restarted if install.sh has replaced its binary since
	# (VMs keep running across a restart).
	systemd=0
	old=$(cat "$PIDFILE" 2>/dev/null || true)
	if [ -n "$old" ] && [[ "$(readlink "/proc/$old/exe" 2>/dev/null)" == *"noid-server (deleted)" ]]; then
		echo "restarting noid-server (pid $old): its binary was updated"
		kill "$old"
		for _ in $(seq 1 150); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
	fi
	if ! up; then
		mkdir -p /var/log
		setsid nohup noid-server serve --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
		pid=$!
		echo "$pid" >"$PIDFILE"
	fi
fi
for _ in $(seq 1 100); do
	up && break
	if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then break; fi
	sleep 0.2
done
noid version
if ! up; then
	if [ $systemd = 1 ]; then
		echo "quickstart: noid-server did not start; see \`systemctl status noid-server\` and \`journalctl -u noid-server -p warning\`" >&2
	else
		echo "quickstart: noid-server did not start; the end of $LOG:" >&2
		tail -n 5 "$LOG" >&2
	fi
	trap - ERR
	doctor
	exit 1
fi

if ! noid golden list 2>/dev/null | grep -q ready; then
	say "provisioning the default golden snapshot (VMs then start from it instead of booting)"
	./scripts/provision-golden.sh
fi

say "creating VM '$VM'"
noid destroy "$VM" >/dev/null 2>&1 || true
noid create "$VM"
say "running a command in it"
noid exec "$VM" -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"; cat /etc/os-release | head -1'

cat <<MSG

noid is running. Try:
  noid exec $VM -- ls /          run a command
  noid exec $VM -- python3 -c 'print(42)'      python3, curl, ping, less, nano are in the image
  noid exec $VM --user noid -- sudo id -u      as the user noid, with passwordless sudo
  noid console $VM               interactive shell (Ctrl-] detaches)
  noid checkpoint $VM clean      capture the VM
  noid restore $VM clean         rewind to it
  noid restore $VM clean --as copy   clone it
  noid list / noid info $VM / noid destroy $VM
MSG
if [ $systemd = 1 ]; then
	echo "noid-server runs under systemd: systemctl status noid-server; its log: journalctl -u noid-server (-p warning for problems)"
else
	echo "noid-server runs in the background (log $LOG, pid in $PIDFILE); nothing restarts it after a reboot: re-run this script"
fi
echo "noid-server doctor --config $CONFIG checks the host and says what to fix."
