#!/usr/bin/env bash
# build-v2v-guest.sh: build a small "foreign" Debian 12 guest for the virt-v2v test.
#
# A 2 GiB raw disk (MBR, one ext4 partition) holding a debootstrap'ed Debian 12
# (minbase, the stock kernel, GRUB in the MBR), set up as if it came from another
# hypervisor with SATA disks:
#   - /etc/fstab names its root /dev/sda1;
#   - its initramfs has the SATA drivers only (MODULES=list: ahci, sd_mod, ext4),
#     no virtio, so on a virtio disk it cannot find its root until virt-v2v has
#     converted it;
#   - the kernel's init is /usr/local/sbin/thinair-v2v-init, which prints on ttyS0
#       THINAIR-V2V-BOOTED fstab-root=<device> present=<yes|no> kernel=<version>
#     and then idles (no systemd: a TCG boot stays short).
# The tree goes into the partition with mkfs.ext4 -d and GRUB is written with dd,
# so no loop device or mount is needed on the host.
#
# Everything comes from Debian packages, from the mirror apt already uses. The
# packages this build and virt-v2v need (debootstrap, virt-v2v, guestfs-tools, a
# host kernel for libguestfs's appliance) are installed here when missing.
#
# Usage: scripts/build-v2v-guest.sh [OUT]
#   OUT defaults to ${THINAIR_CACHE:-/var/cache/thinair}/v2v-guest-v1.raw and is
#   reused when it exists (it is only ever created by a rename). The last line on
#   stdout is OUT's path. Takes ~10 min here (TCG); needs root.
set -euo pipefail

CACHE="${THINAIR_CACHE:-/var/cache/thinair}"
OUT="${1:-$CACHE/v2v-guest-v1.raw}"
BUILD="$CACHE/v2v-build"
SIZE_MIB=2048
PART_START_MIB=1
INIT=/usr/local/sbin/thinair-v2v-init

log() { echo "build-v2v-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -f "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi
[[ $EUID == 0 ]] || die "needs root (debootstrap, apt)"
mkdir -p "$BUILD" "$(dirname "$OUT")"
exec 9>"$BUILD/.lock"
flock 9
if [[ -f "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi
START=$(date +%s)

# ---------------------------------------------------------------- tools
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v virt-v2v-in-place >/dev/null || need+=(virt-v2v)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
# libguestfs boots its appliance with the host's kernel from /boot.
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || {
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    }
fi

# The KVM here cannot run a stock Debian kernel (see FACTS.md): the appliance uses TCG
# unless THINAIR_DOMAIN_TYPE=kvm.
export LIBGUESTFS_BACKEND=direct
[[ "${THINAIR_DOMAIN_TYPE:-auto}" == kvm ]] || export LIBGUESTFS_BACKEND_SETTINGS=force_tcg

# ---------------------------------------------------------------- root tree
MIRROR=$(awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ { print $2; exit }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[[ -n "$MIRROR" ]] || MIRROR=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' \
    /etc/apt/sources.list 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT="$BUILD/root"
if [[ ! -f "$BUILD/root.done" ]]; then
    rm -rf "$ROOT"
    log "debootstrap bookworm from $MIRROR (a few minutes)"
    debootstrap --variant=minbase \
        --include=linux-image-amd64,grub-pc-bin,grub2-common,initramfs-tools,kmod,udev \
        bookworm "$ROOT" "$MIRROR" >"$BUILD/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $BUILD/debootstrap.log"
    touch "$BUILD/root.done"
fi

log "configuring the guest"
echo "v2v-guest" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/fstab" <<'EOF'
# A SATA disk, as on the hypervisor this guest comes from.
/dev/sda1  /  ext4  errors=remount-ro  0  1
EOF
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
cat >"$ROOT/etc/initramfs-tools/modules" <<'EOF'
# The drivers of the source hypervisor's disk controller; no virtio.
ahci
sd_mod
ext4
EOF
cat >"$ROOT/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200 init=$INIT"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
cat >"$ROOT$INIT" <<'EOF'
#!/bin/sh
# thinair's v2v test guest: say what booted, then idle.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
root=$(awk '$2 == "/" { print $1 }' /etc/fstab)
present=no
[ -b "$root" ] && present=yes
echo "THINAIR-V2V-BOOTED fstab-root=$root present=$present kernel=$(uname -r)" >/dev/ttyS0
while :; do sleep 3600; done
EOF
chmod 0755 "$ROOT$INIT"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*

# The SATA-only initramfs, and GRUB's config written by hand (grub-mkconfig and
# grub-install need the disk as a block device; this build has a plain file).
KVER=$(basename "$(compgen -G "$ROOT/boot/vmlinuz-*" | sort -V | tail -n 1)")
KVER=${KVER#vmlinuz-}
[[ -n "$KVER" ]] || die "no kernel in $ROOT/boot"
log "initramfs for $KVER (MODULES=list: no virtio)"
chroot "$ROOT" update-initramfs -u -k "$KVER" >"$BUILD/initramfs.log" 2>&1 ||
    die "update-initramfs failed; see $BUILD/initramfs.log"
if lsinitramfs "$ROOT/boot/initrd.img-$KVER" 2>/dev/null | grep -q 'virtio_blk'; then
    die "the initramfs has virtio_blk: it would boot without a conversion"
fi
FS_UUID=5f0b7b4e-7468-696e-6169-722d76327632
mkdir -p "$ROOT/boot/grub"
rm -rf "$ROOT/boot/grub/i386-pc"
cp -r "$ROOT/usr/lib/grub/i386-pc" "$ROOT/boot/grub/i386-pc" # GRUB's modules, as grub-install copies them
cat >"$ROOT/boot/grub/grub.cfg" <<GRUBCFG
set default=0
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux' {
    insmod part_msdos
    insmod ext2
    search --no-floppy --fs-uuid --set=root $FS_UUID
    linux /boot/vmlinuz-$KVER root=UUID=$FS_UUID ro console=ttyS0,115200 init=$INIT
    initrd /boot/initrd.img-$KVER
}
GRUBCFG
rm -f "$ROOT/core.img"
chroot "$ROOT" grub-mkimage -O i386-pc -d /usr/lib/grub/i386-pc -o /core.img \
    -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 search_fs_uuid
mv "$ROOT/core.img" "$BUILD/core.img"

# ---------------------------------------------------------------- disk
TMP="$OUT.tmp"
trap 'rm -f "$TMP"' EXIT
rm -f "$TMP"
truncate -s "${SIZE_MIB}M" "$TMP"
printf 'label: dos\nstart=%dMiB, type=83, bootable\n' "$PART_START_MIB" | sfdisk -q "$TMP"
# GRUB as grub-install puts it on a BIOS disk: boot.img's code in the MBR (the
# partition table kept), core.img in the gap before the partition (boot.img loads
# sector 1, whose blocklist loads the rest from sector 2: both GRUB's defaults).
dd if="$ROOT/usr/lib/grub/i386-pc/boot.img" of="$TMP" bs=440 count=1 conv=notrunc status=none
dd if="$BUILD/core.img" of="$TMP" bs=512 seek=1 conv=notrunc status=none
log "mkfs.ext4 -d (the tree into the partition, no mount)"
mkfs.ext4 -q -F -L v2v-root -U "$FS_UUID" -E offset=$((PART_START_MIB * 1024 * 1024)) \
    -d "$ROOT" "$TMP" "$((SIZE_MIB - PART_START_MIB))M"
mv "$TMP" "$OUT"
trap - EXIT
log "built $OUT in $(($(date +%s) - START)) s"
echo "$OUT"
