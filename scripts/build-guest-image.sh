#!/usr/bin/env bash
# build-guest-image.sh: build thinair's test guest disk, offline from Debian packages.
#
# The result is a 256 MiB raw image that boots under SeaBIOS (QEMU TCG) from a virtio
# disk: a FAT32 "superfloppy" with syslinux, a stock Debian 6.1 kernel and a busybox
# initramfs whose /init prints markers on ttyS0 and keeps appending numbered records
# to its own disk, so that tests can check a VM's disk after a copy, mirror or restart.
# tests/support/guest.py holds the same layout as Python constants; keep both in step.
#
# Layout (byte offsets):
#   [0, 64 MiB)                FAT32: ldlinux.sys/.c32, syslinux.cfg, vmlinuz, initrd.gz
#   [64 MiB, +512)             header "THINAIR-HDR next=<N>" NUL-padded (zeros: next=0)
#   [64 MiB+4096, 96 MiB)      record slots, 512 B each: slot N at 64MiB+4096+N*512 holds
#                              "THINAIR-REC seq=<N> boot=<B> md5=<md5("seq=<N> boot=<B>")>\n"
#   [96 MiB, 160 MiB)          pattern: SHAKE-256 of "thinair-guest-pattern-v1", 64 MiB
#   [160 MiB, 256 MiB)         zeros (sparse)
# B is the seq of the first record written by that boot.
#
# Usage: scripts/build-guest-image.sh [OUT]
#   OUT defaults to ${THINAIR_CACHE:-/var/cache/thinair}/guest-v1.raw. The .debs are kept
#   in ${THINAIR_CACHE:-/var/cache/thinair}/build, so a rebuild downloads nothing. If OUT
#   already exists (it is only ever created by a rename), it is reused. The last line on
#   stdout is OUT's path.
set -euo pipefail

CACHE="${THINAIR_CACHE:-/var/cache/thinair}"
OUT="${1:-$CACHE/guest-v1.raw}"
BUILD="$CACHE/build"

MIB=$((1024 * 1024))
IMAGE_SIZE=$((256 * MIB))
FAT_SIZE=$((64 * MIB))
PATTERN_OFFSET=$((96 * MIB))
PATTERN_SIZE=$((64 * MIB))
PATTERN_SEED="thinair-guest-pattern-v1"
# Every timestamp in the image (cpio, FAT) is this one, so rebuilds give the same bytes.
EPOCH=946684800 # 2000-01-01 00:00:00 UTC
# Kernel modules loaded by /init, in this order.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev"

log() { echo "build-guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

image_complete() {
    [[ -f "$1" ]] && [[ "$(stat -c %s "$1")" == "$IMAGE_SIZE" ]]
}

if image_complete "$OUT"; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$BUILD" "$(dirname "$OUT")"
# One build at a time per cache; another one may have finished while we waited.
exec 9>"$BUILD/.lock"
flock 9
if image_complete "$OUT"; then
    echo "$OUT"
    exit 0
fi

START=$(date +%s.%N)

# ---------------------------------------------------------------- build tools
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

need=()
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v syslinux >/dev/null || need+=(syslinux syslinux-common)
command -v mcopy >/dev/null || need+=(mtools)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    [[ $EUID == 0 ]] || die "missing build tools (${need[*]}); install them as root"
    log "installing ${need[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    fi
fi

# ---------------------------------------------------------------- packages
APT_OPTS=()
# As root, apt drops to _apt for downloads and warns when it cannot write the target dir.
[[ $EUID == 0 ]] && APT_OPTS=(-o APT::Sandbox::User=root)

cached_deb() { # newest cached .deb matching a glob, or nothing
    local f
    f=$(compgen -G "$BUILD/$1" | sort -V | tail -n 1 || true)
    [[ -n "$f" ]] && echo "$f"
    return 0
}

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}

download() { # package -> $BUILD/<package>_<version>_<arch>.deb
    # Into a scratch dir first, so that a killed download never leaves a cached .deb.
    local dl="$BUILD/download"
    log "apt-get download $1"
    rm -rf "$dl"
    mkdir -p "$dl"
    (cd "$dl" && apt-get download -qq "${APT_OPTS[@]}" "$1" >&2)
    mv "$dl"/*.deb "$BUILD/"
    rmdir "$dl"
}

KERNEL_DEB=$(cached_deb 'linux-image-6.1.0-*-amd64_*_amd64.deb')
if [[ -z "$KERNEL_DEB" ]]; then
    pkg=$(kernel_package || true)
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg=$(kernel_package || true)
    fi
    [[ -n "$pkg" ]] || die "apt-cache depends linux-image-amd64 names no kernel package"
    download "$pkg"
    KERNEL_DEB=$(cached_deb "${pkg}_*_amd64.deb")
    [[ -n "$KERNEL_DEB" ]] || die "download of $pkg left no .deb in $BUILD"
fi
BUSYBOX_DEB=$(cached_deb 'busybox-static_*_amd64.deb')
if [[ -z "$BUSYBOX_DEB" ]]; then
    if ! apt-cache show busybox-static >/dev/null 2>&1; then
        apt_update_once
    fi
    download busybox-static
    BUSYBOX_DEB=$(cached_deb 'busybox-static_*_amd64.deb')
    [[ -n "$BUSYBOX_DEB" ]] || die "download of busybox-static left no .deb in $BUILD"
fi
log "kernel: ${KERNEL_DEB##*/}"
log "busybox: ${BUSYBOX_DEB##*/}"

# ---------------------------------------------------------------- extract
rm -rf "$BUILD"/work.* # left by a killed build (we hold the lock)
WORK=$(mktemp -d "$BUILD/work.XXXXXX")
TMP="$OUT.tmp"
cleanup() { rm -rf "$WORK"; rm -f "$TMP"; }
trap cleanup EXIT

mkdir -p "$WORK/kernel" "$WORK/busybox"
# Only the kernel and the few modules we load: the package unpacks to ~400 MB.
patterns=('*/boot/vmlinuz-*')
for m in $MODULES; do patterns+=("*/kernel/drivers/*/$m.ko*"); done
dpkg-deb --fsys-tarfile "$KERNEL_DEB" | tar -x -C "$WORK/kernel" --wildcards "${patterns[@]}"
dpkg -x "$BUSYBOX_DEB" "$WORK/busybox"

VMLINUZ=$(find "$WORK/kernel" -path '*/boot/vmlinuz-*' -type f | head -n 1)
[[ -n "$VMLINUZ" ]] || die "no vmlinuz in ${KERNEL_DEB##*/}"
log "kernel version: ${VMLINUZ##*/vmlinuz-}"
BUSYBOX=$(find "$WORK/busybox" -name busybox -type f -perm -u+x | head -n 1)
[[ -n "$BUSYBOX" ]] || die "no busybox in ${BUSYBOX_DEB##*/}"

# ---------------------------------------------------------------- initramfs
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc/acpi/PWRF,proc,sys,dev,tmp,run}
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
    [[ "$applet" == bin/busybox || -e "$ROOT/$applet" ]] && continue
    ln -s /bin/busybox "$ROOT/$applet"
done < <("$ROOT/bin/busybox" --list-full)

for m in $MODULES; do
    src=$(find "$WORK/kernel" -name "$m.ko*" -type f | head -n 1)
    [[ -n "$src" ]] || die "module $m not found in ${KERNEL_DEB##*/}"
    dst="$ROOT/lib/modules/$m.ko"
    # busybox insmod takes plain .ko files only; Debian 12's are uncompressed.
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
done
# The kernel opens /dev/console before /init runs; /init redirects to it again anyway.
if [[ $EUID == 0 ]]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
fi

# Power button (virsh shutdown, QEMU system_powerdown) -> busybox acpid runs this.
cat >"$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# Ask /init (PID 1) to stop between two writes and power off; force it after 10 s.
: >/run/thinair-poweroff
kill -USR1 1
sleep 10
echo "THINAIR-POWEROFF" >/dev/console
sync
poweroff -f
EOF
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# thinair test guest /init (busybox sh, PID 1). Built by scripts/build-guest-image.sh;
# the layout constants below are also in tests/support/guest.py.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# End whatever the firmware left on the serial line (SeaBIOS: a terminal reset, no newline).
echo

HDR_SECTOR=131072        # 64 MiB / 512
SLOT0_SECTOR=131080      # (64 MiB + 4096) / 512
NSLOTS=65528             # (32 MiB - 4096) / 512
PATTERN_SKIP_MIB=96
PATTERN_MIB=64
POWEROFF_FLAG=/run/thinair-poweroff

STOP=0
trap 'STOP=1' USR1

power_off_if_asked() {
    if [ "$STOP" = 1 ] || [ -e "$POWEROFF_FLAG" ]; then
        sync
        echo "THINAIR-POWEROFF"
        poweroff -f
        sleep 5
    fi
}

# Sleep $1 ms; a power button press (SIGUSR1) cuts it short.
sleep_ms() {
    [ "$1" -gt 0 ] || return 0
    usleep $(($1 * 1000)) &
    SLEEPER=$!
    wait $SLEEPER
    kill $SLEEPER 2>/dev/null
    wait $SLEEPER 2>/dev/null
    return 0
}

idle_forever() {
    while :; do
        power_off_if_asked
        sleep_ms 1000
    done
}

fatal() {
    echo "THINAIR-ERROR $*"
    idle_forever
}

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev; do
    insmod /lib/modules/$m.ko || echo "THINAIR-ERROR insmod $m failed"
done

# Power button: acpid watches /dev/input/event* and runs /etc/acpi/PWRF/00000080.
i=0
while [ $i -lt 20 ] && ! ls /dev/input/event* >/dev/null 2>&1; do
    usleep 50000
    i=$((i + 1))
done
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid || echo "THINAIR-ERROR acpid failed"

i=0
while [ ! -b /dev/vda ]; do
    [ $i -lt 600 ] || fatal "no /dev/vda after 30 s"
    usleep 50000
    i=$((i + 1))
done

read -r UPTIME _ </proc/uptime
echo "THINAIR-BOOT-OK uptime=$UPTIME"

for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    n=${d##*/}
    size=$(($(cat "$d/size") * 512))
    sum=$(dd if="/dev/$n" bs=1048576 count=1 2>/dev/null | md5sum)
    echo "THINAIR-DISK name=$n size=$size head_md5=${sum%% *}"
done

sum=$(dd if=/dev/vda bs=1048576 skip=$PATTERN_SKIP_MIB count=$PATTERN_MIB 2>/dev/null | md5sum)
echo "THINAIR-PATTERN md5=${sum%% *}"

INTERVAL=1000
# shellcheck disable=SC2013 # words, not lines
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        thinair.interval=*)
            v=${arg#thinair.interval=}
            case "$v" in
                '' | *[!0-9]*) echo "THINAIR-ERROR bad $arg" ;;
                *) INTERVAL=$v ;;
            esac
            ;;
    esac
done

hdr=$(dd if=/dev/vda bs=512 skip=$HDR_SECTOR count=1 2>/dev/null | tr -d '\000')
N=0
case "$hdr" in
    "THINAIR-HDR next="*)
        v=${hdr#THINAIR-HDR next=}
        case "$v" in
            '' | *[!0-9]*) ;;
            *)
                v=$(echo "$v" | sed 's/^0*//')
                if [ -z "$v" ]; then
                    N=0
                elif [ ${#v} -gt 9 ] || [ "$v" -gt $NSLOTS ]; then
                    N=$NSLOTS
                else
                    N=$v
                fi
                ;;
        esac
        ;;
esac
BOOT=$N

FULL=0
while :; do
    power_off_if_asked
    if [ "$N" -ge $NSLOTS ]; then
        if [ $FULL = 0 ]; then
            echo "THINAIR-FULL next=$N"
            FULL=1
        fi
        sleep_ms 1000
        continue
    fi
    body="seq=$N boot=$BOOT"
    sum=$(printf '%s' "$body" | md5sum)
    if printf 'THINAIR-REC %s md5=%s\n' "$body" "${sum%% *}" |
        dd of=/dev/vda bs=512 count=1 seek=$((SLOT0_SECTOR + N)) \
            iflag=fullblock conv=sync,notrunc,fsync 2>/dev/null &&
        printf 'THINAIR-HDR next=%s' $((N + 1)) |
        dd of=/dev/vda bs=512 count=1 seek=$HDR_SECTOR \
            iflag=fullblock conv=sync,notrunc,fsync 2>/dev/null; then
        echo "THINAIR-WROTE seq=$N"
        N=$((N + 1))
    else
        echo "THINAIR-ERROR write seq=$N failed"
    fi
    sleep_ms "$INTERVAL"
done
EOF
chmod 0755 "$ROOT/init"

find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --reproducible --quiet) | gzip -9 -n >"$WORK/initrd.gz"

# ---------------------------------------------------------------- boot files
cat >"$WORK/syslinux.cfg" <<'EOF'
DEFAULT thinair
PROMPT 0
TIMEOUT 0
LABEL thinair
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet
EOF
cp "$VMLINUZ" "$WORK/vmlinuz"
touch -d "@$EPOCH" "$WORK/vmlinuz" "$WORK/syslinux.cfg" "$WORK/initrd.gz"

# ---------------------------------------------------------------- image
rm -f "$TMP"
truncate -s "$IMAGE_SIZE" "$TMP"
SOURCE_DATE_EPOCH=$EPOCH mkfs.vfat --invariant -F 32 -n THINAIR -i 7417A1A0 "$TMP" $((FAT_SIZE / 1024)) >/dev/null 2>&1 ||
    die "mkfs.vfat failed"
SOURCE_DATE_EPOCH=$EPOCH syslinux --install "$TMP"
SOURCE_DATE_EPOCH=$EPOCH MTOOLS_SKIP_CHECK=1 mcopy -m -i "$TMP" "$WORK/syslinux.cfg" "$WORK/vmlinuz" "$WORK/initrd.gz" ::

python3 - "$TMP" "$PATTERN_OFFSET" "$PATTERN_SIZE" "$PATTERN_SEED" <<'EOF'
import hashlib
import os
import sys

path, offset, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = hashlib.shake_256(seed.encode()).digest(size)
with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
EOF

sync "$TMP"
image_complete "$TMP" || die "built image has the wrong size"
mv -f "$TMP" "$OUT"
log "built in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$START" "$(date +%s.%N)") s, $(du -k "$OUT" | cut -f1) KiB allocated"
echo "$OUT"
