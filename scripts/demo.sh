#!/usr/bin/env bash
# The main job, on a fresh machine: set everything up, start an engine (SQLite,
# local libvirt), expose the test guest image read-only with qemu-nbd as "another
# host" would, run a VM out of thin air from that export, show it booting and how
# long it took, then roll everything back. Leaves nothing behind.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
image=$("$top/scripts/build-guest-image.sh" | tail -n 1)

work=$(mktemp -d /var/tmp/thinair-demo.XXXXXX)
chmod 0755 "$work"
export THINAIR_HOME="$work/home" THINAIR_IMAGE_ROOTS="$work"  # storage domains lie under the roots
port=$("$top/.venv/bin/python" -c 'from thinair.adapters.qemu_nbd import free_port; print(free_port())')
nbd_port=$("$top/.venv/bin/python" -c 'from thinair.adapters.qemu_nbd import free_port; print(free_port())')
export THINAIR_LISTEN="127.0.0.1:$port" THINAIR_URL="http://127.0.0.1:$port"
thinair="$top/.venv/bin/thinair"
engine_pid="" nbd_pid=""

cleanup() {
  set +e
  "$thinair" vm rollback demo >/dev/null 2>&1
  for pid in $engine_pid $nbd_pid; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

echo "== the other host: export the image read-only over NBD"
step qemu-nbd --read-only --persistent --shared=8 --port "$nbd_port" "$image"
qemu-nbd --read-only --persistent --shared=8 --format raw --bind 127.0.0.1 \
  --port "$nbd_port" --export-name guest "$image" &
nbd_pid=$!
sum_before=$(sha256sum "$image" | cut -d' ' -f1)

echo "== this host: the engine"
"$thinair" engine >"$work/engine.log" 2>&1 &
engine_pid=$!
for _ in $(seq 100); do
  "$thinair" storage list >/dev/null 2>&1 && break
  sleep 0.2
done

mkdir -m 0755 "$work/tmp"
step thinair storage add tmp "$work/tmp"
"$thinair" storage add tmp "$work/tmp"
step thinair vm create demo --memory 256 --disk "nbd://127.0.0.1:$nbd_port/guest"
"$thinair" vm create demo --memory 256 --disk "nbd://127.0.0.1:$nbd_port/guest"
step thinair vm start demo
t0=$(date +%s.%N)
"$thinair" vm start demo
echo "waiting for the guest's boot marker on its serial console..."
until "$thinair" vm console demo | grep -q THINAIR-BOOT-OK; do
  if awk "BEGIN{exit !($(date +%s.%N) - $t0 > 120)}"; then
    echo "the guest did not boot in 120 s; its console:" >&2
    "$thinair" vm console demo >&2
    exit 1
  fi
  sleep 0.2
done
t1=$(date +%s.%N)
step thinair vm console demo
"$thinair" vm console demo | grep THINAIR- | head -8
step virsh dumpxml demo "(the disk)"
virsh -c qemu:///system dumpxml demo | sed -n '/<disk/,/<\/disk>/p'
step thinair vm show demo
"$thinair" vm show demo
printf '\nfrom `vm start` to the guest booted from the remote disk: %.1f s\n' \
  "$(awk "BEGIN{print $t1 - $t0}")"

step thinair vm rollback demo
"$thinair" vm rollback demo
left=$(find "$work/tmp" -type f | wc -l)
virsh -c qemu:///system domstate demo >/dev/null 2>&1 && { echo "domain left behind" >&2; exit 1; }
sum_after=$(sha256sum "$image" | cut -d' ' -f1)
echo "files left on the storage domain: $left; libvirt domain: gone"
[ "$left" = 0 ] || exit 1
if [ "$sum_before" = "$sum_after" ]; then
  echo "external image unchanged (sha256 $sum_after)"
else
  echo "external image CHANGED" >&2; exit 1
fi
