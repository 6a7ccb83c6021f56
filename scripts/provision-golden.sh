#!/usr/bin/env bash
# Builds a golden snapshot: a pre-booted VM that `noid create` restores
# instead of booting. Run as root on the server host.
#
#   scripts/provision-golden.sh                       provision a new golden (default spec)
#   scripts/provision-golden.sh --vcpus 2 --memory 4096
#   scripts/provision-golden.sh --from-checkpoint ID  promote an existing checkpoint
#
# Promotion backs up the existing golden for the spec first (timestamped,
# in <data_dir>/golden/.backup/, the last 3 kept), and the script is safe to
# re-run: a leftover _provision VM is replaced. Environment: NOID (the noid
# CLI, default `noid` on PATH), NOID_URL/NOID_TOKEN as for noid itself, and
# PROVISION_EXTRA (a shell command run in the VM after the install section).
set -euo pipefail

NOID=${NOID:-noid}
VM=_provision
vcpus=""
memory=""
from_checkpoint=""
while [ $# -gt 0 ]; do
	case "$1" in
	--vcpus) vcpus=$2; shift 2 ;;
	--memory) memory=$2; shift 2 ;;
	--from-checkpoint) from_checkpoint=$2; shift 2 ;;
	-h|--help) sed -n '2,13p' "$0"; exit 0 ;;
	*) echo "provision-golden: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done

if [ -n "$from_checkpoint" ]; then
	$NOID golden promote --checkpoint-id "$from_checkpoint"
	exit 0
fi

args=(--cold)
[ -n "$vcpus" ] && args+=(--vcpus "$vcpus")
[ -n "$memory" ] && args+=(--memory "$memory")

# A leftover from an interrupted run is removed first.
$NOID destroy "$VM" >/dev/null 2>&1 || true
trap '$NOID destroy "$VM" >/dev/null 2>&1 || true' EXIT

echo "provision-golden: creating $VM"
$NOID create "$VM" "${args[@]}"

# Runs a command in the VM as root, whatever the server's [exec] default_user.
in_vm() { $NOID exec "$VM" --user root -- "$@"; }

# ---------------------------------------------------------------------------
# INSTALL SECTION: edit freely. Everything here runs inside the VM before the
# snapshot is taken, so VMs created from the golden start with it in place.
# Each step is an `in_vm …` command (noid exec as root). The default Debian
# image already has python3, curl, ping, ip, ps, less, nano and sudo, and a
# user noid (noid exec --user noid); `noid-server image build --packages a,b`
# bakes more packages into the image itself.
# ---------------------------------------------------------------------------
in_vm sh -c 'mkdir -p /etc/noid && date -u +%Y-%m-%dT%H:%M:%SZ > /etc/noid/golden-provisioned'
if in_vm sh -c 'command -v apt-get' >/dev/null 2>&1; then
	: # Debian image: for example
	# in_vm sh -c 'apt-get update && apt-get install -y git build-essential'
fi
if [ -n "${PROVISION_EXTRA:-}" ]; then
	in_vm sh -c "$PROVISION_EXTRA"
fi
# ---------------------------------------------------------------------------
# END OF INSTALL SECTION
# ---------------------------------------------------------------------------

# Flush the guest's caches so the snapshot's disk is tidy.
in_vm sync

cp_out=$($NOID checkpoint "$VM" golden --label "provisioned $(date -u +%F)")
echo "provision-golden: $cp_out"
$NOID golden promote "$VM" golden
$NOID destroy "$VM" >/dev/null
trap - EXIT
echo "provision-golden: done; \`noid create\` with this spec now restores the golden snapshot"
