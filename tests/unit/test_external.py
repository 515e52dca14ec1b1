"""External disk URLs and --disk options: what is accepted, what is refused and why."""

from __future__ import annotations

import pytest

from thinair.errors import InvalidInput
from thinair.external import DiskSpec, parse_disk_option, parse_url


@pytest.mark.parametrize(
    "url,scheme",
    [
        ("nbd://127.0.0.1:10809/export", "nbd"),
        ("nbd://host/", "nbd"),
        ("nbd://[::1]:10809/e", "nbd"),
        ("nbd+unix:///export?socket=/run/nbd.sock", "nbd+unix"),
        ("nbds://alice@host:10809/e?tls-psk-file=/etc/keys.psk", "nbds"),
        ("nbds://host/e?tls-certificates=/etc/pki/nbd", "nbds"),
        ("nbds+unix:///e?socket=/run/s.sock&tls-psk-file=/k.psk", "nbds+unix"),
        ("http://server/images/disk.img", "http"),
        ("https://server:8443/disk.qcow2?token=abc", "https"),
        ("ssh://root@host:22/var/lib/images/disk.raw", "ssh"),
        ("ftp://host/pub/disk.img", "ftp"),
        ("/var/lib/images/disk.raw", "file"),
        ("file:///var/lib/images/disk.raw", "file"),
    ],
)
def test_accepted_urls(url: str, scheme: str) -> None:
    assert parse_url(url).scheme == scheme


@pytest.mark.parametrize(
    "url,reason",
    [
        ("", "empty"),
        ("relative/disk.img", "unsupported URL scheme"),
        ("gopher://host/disk", "unsupported URL scheme"),
        ("nbd://host:99999/e", "bad port"),
        ("nbd://host:0/e", "bad port"),
        ("nbd:///export", "no host"),
        ("nbd://host/e?x=1", "no query"),
        ("nbd+unix:///export", "socket="),
        ("nbd+unix:///export?socket=relative.sock", "socket="),
        ("http://host", "names no file"),
        ("http://host/a b", "percent-encoded"),
        ("http://host/a'b\"", "percent-encoded"),
        ("http://host/\u00e9", "percent-encoded"),
        ("/var/../etc/shadow", "plain absolute path"),
        ("/var/lib/x;rm -rf", "plain absolute path"),
        ("nbds://host/e?tls-psk-file=relative.psk", "absolute path"),
        ("nbds://host/e?password=x", "unknown or repeated parameter"),
        ("nbds+unix:///e", "socket="),
        ("http://host/" + "a" * 5000, "longer than"),
    ],
)
def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_url(url)


def test_disk_option_all_keys() -> None:
    spec = parse_disk_option("nbd://h/e,format=qcow2,storage=tmp,check-readonly=off")
    assert spec == DiskSpec(url="nbd://h/e", format="qcow2", storage="tmp", check_readonly=False)


def test_disk_option_double_comma_is_a_literal_comma() -> None:
    spec = parse_disk_option("http://h/a,,b.img,format=raw")
    assert spec.url == "http://h/a,b.img"
    assert spec.format == "raw"


@pytest.mark.parametrize(
    "option,reason",
    [
        ("nbd://h/e,format=bogus", "unknown disk format"),
        ("nbd://h/e,size=10", "bad disk option"),
        ("nbd://h/e,format", "bad disk option"),
        ("nbd://h/e,format=raw,format=qcow2", "given twice"),
        ("nbd://h/e,check-readonly=maybe", "on or off"),
    ],
)
def test_disk_option_refused(option: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_disk_option(option)
