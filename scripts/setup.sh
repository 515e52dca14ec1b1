#!/usr/bin/env bash
# Prepare this machine for thinair: Debian packages, libvirt daemons, /dev/kvm,
# the Python venv, and the test guest image. Safe to run again: each step checks
# first and does only what is missing. Needs root (apt, daemons).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

packages=(
  qemu-system-x86 qemu-utils
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
  nbdkit libnbd-bin python3-libnbd python3-libvirt python3-venv
  syslinux syslinux-common mtools dosfstools cpio
  gnutls-bin nginx-light qemu-block-extra tcpdump
  chromium chromium-driver
  postgresql iproute2
  prometheus
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# `systemd-analyze verify` checks the unit in systemd/ (no running systemd is
# needed); Debian's systemd package has it. Only when it is missing: installing
# systemd on a machine that runs another init changes nothing else here.
if ! command -v systemd-analyze >/dev/null; then
  say "installing systemd (for systemd-analyze)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# Without udev /dev/kvm is root-only; libvirt then re-probes QEMU on every start
# (tens of seconds). Give it what Debian's udev rules give it.
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# No systemd here: start the daemons ourselves when they are not running.
if ! pgrep -x virtlogd >/dev/null; then
  say "starting virtlogd"
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  say "starting libvirtd"
  libvirtd -d
fi
for _ in $(seq 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null

# A venv that also sees Debian's libvirt and libnbd bindings.
venv="$top/.venv"
stamp="$venv/.thinair-installed"
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing thinair and its Python dependencies"
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -c "import thinair, libvirt, nbd" 
  echo "$want" >"$stamp"
fi

# xterm.js for the web UI's console terminal, from the npm registry (as Proxmox
# ships it); not in git. Without it the console dialog still shows the output.
xterm_version=5.5.0
xterm_dir="$top/thinair/web/static/vendor/xterm"
if [ ! -f "$xterm_dir/$xterm_version" ] && command -v npm >/dev/null; then
  say "fetching xterm.js $xterm_version (npm)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@xterm/xterm@$xterm_version" >/dev/null)
  mkdir -p "$xterm_dir"
  tar -xzf "$tmp"/xterm-xterm-*.tgz -C "$tmp"
  cp "$tmp/package/lib/xterm.js" "$tmp/package/css/xterm.css" "$tmp/package/LICENSE" "$xterm_dir/"
  touch "$xterm_dir/$xterm_version"
  rm -rf "$tmp"
fi

# The test guest: built from Debian packages, cached outside the tree.
image=$("$top/scripts/build-guest-image.sh" | tail -n 1)
say "ready: venv $venv, guest image $image"
