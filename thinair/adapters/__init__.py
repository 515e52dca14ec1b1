"""Thin wrappers over real tools, one module each (qemu-img, qemu-nbd, libnbd, libvirt)."""
