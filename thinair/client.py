"""The Python SDK: a typed client of the engine's REST API (httpx).

import thinair
c = thinair.Client()              # THINAIR_URL, THINAIR_TOKEN or the local token
c.storage_domains.add("tmp", "/srv/thinair/tmp")
vm = c.vms.create("web1", disks=["nbd://host/export"], memory_mib=256)
c.vms.start("web1")
"""

from __future__ import annotations

import builtins
import json
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import PrivateAttr

from thinair import models
from thinair.config import Settings
from thinair.errors import ThinairError
from thinair.external import is_blank_option, parse_blank_option, parse_disk_option
from thinair.states import JOB_ACTIVE


class ThinairAPIError(Exception):
    """An error answer from the engine; `code` is the API's stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class EngineUnreachable(ThinairAPIError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            0,
            "unreachable",
            f"no thinair engine at {url} ({reason}); start one with `thinair engine`",
        )


def _local_token(settings: Settings) -> str | None:
    try:
        return Path(settings.token_file).read_text().strip() or None
    except OSError:
        return None


class Client:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 600.0,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or Settings.load()
        self.url = (url or settings.url).rstrip("/")
        if not self.url.startswith(("http://", "https://")) or "//" not in self.url[:8]:
            raise ThinairAPIError(
                0,
                "invalid_input",
                f"THINAIR_URL must be http://HOST:PORT or https://HOST:PORT, not {self.url!r}",
            )
        token = token or settings.token or _local_token(settings)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # The engine's own CA when given (an HTTPS engine with its own certificate).
        verify: ssl.SSLContext | bool = True
        if settings.ca_cert:
            verify = ssl.create_default_context(cafile=settings.ca_cert)
        self._http = httpx.Client(
            base_url=self.url + "/api/v1", headers=headers, timeout=timeout, verify=verify
        )
        self.storage_domains = StorageDomains(self)
        self.vms = Vms(self)
        self.disks = Disks(self)
        self.jobs = Jobs(self)
        self.exports = Exports(self)
        self.tokens = Tokens(self)
        self.hosts = Hosts(self)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            try:
                r = self._http.request(method, path, **kwargs)
            except httpx.RemoteProtocolError:
                # A kept-alive connection the engine closed as the request went
                # out (uvicorn closes idle ones after 5 s): sent again on a new
                # one, as urllib3 does, if it changes nothing.
                if method not in ("GET", "HEAD"):
                    raise
                r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise EngineUnreachable(self.url, str(e) or type(e).__name__) from None
        if r.status_code >= 400:
            try:
                body = r.json()
                code, message = body["code"], body["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", f"HTTP {r.status_code}: {r.text[:200]}"
            raise ThinairAPIError(r.status_code, code, message)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def events(self) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """Follow the engine's events (GET /events, server-sent events) as (kind,
        data) pairs, until the caller stops iterating: first ("hello", {}), then
        "vm" (id, name, and state when libvirt reported one), "job" (the whole
        job) and "resync" (fell behind: read everything again)."""
        try:
            with self._http.stream(
                "GET", "/events", timeout=httpx.Timeout(10, read=EVENTS_READ_TIMEOUT)
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    body = r.json()
                    raise ThinairAPIError(r.status_code, body["code"], body["message"])
                kind, data = "message", ""
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        yield kind, json.loads(data)
                        kind, data = "message", ""
        except httpx.TransportError as e:
            raise EngineUnreachable(self.url, str(e) or type(e).__name__) from None

    def health(self) -> models.Health:
        return models.Health.model_validate(self.request("GET", "/health"))

    def audit(
        self, limit: int = 100, token: str | None = None, action: str | None = None
    ) -> list[models.AuditEntry]:
        """The audit log, newest first (an admin token only)."""
        params: dict[str, Any] = {"limit": limit}
        params |= {k: v for k, v in (("token", token), ("action", action)) if v is not None}
        data = self.request("GET", "/audit", params=params)
        return [models.AuditEntry.model_validate(x) for x in data]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# The engine pings an event stream every 15 s: silence longer than this is a
# dead connection.
EVENTS_READ_TIMEOUT = 60.0


class Vm(models.Vm):
    """A VM as the engine last reported it, with its actions."""

    _client: Client = PrivateAttr()

    def _bind(self, client: Client) -> Vm:
        self._client = client
        return self

    def refresh(self) -> Vm:
        return self._client.vms.get(self.id)

    def start(self, host: str | None = None) -> Vm:
        return self._client.vms.start(self.id, host=host)

    def stop(self, force: bool = False, timeout: float | None = None) -> Vm:
        return self._client.vms.stop(self.id, force=force, timeout=timeout)

    def import_(
        self,
        to: str,
        strategy: str | None = None,
        bandwidth_mib: float | None = None,
        verify: str = "digest",
    ) -> Job:
        return self._client.vms.import_(
            self.id, to=to, strategy=strategy, bandwidth_mib=bandwidth_mib, verify=verify
        )

    def rollback(self) -> None:
        self._client.vms.rollback(self.id)

    def remove(self, force: bool = False) -> None:
        self._client.vms.remove(self.id, force=force)

    def console(self, offset: int = 0, wait: float = 0) -> models.Console:
        return self._client.vms.console(self.id, offset, wait)

    def conversion(self) -> Job | None:
        """The `convert` job of a VM created with convert=True (newest first)."""
        return next((j for j in self._client.jobs.list(vm=self.id) if j.kind == "convert"), None)


class Job(models.Job):
    """A long operation; `wait()` follows it to its end."""

    _client: Client = PrivateAttr()

    def _bind(self, client: Client) -> Job:
        self._client = client
        return self

    def wait(
        self, progress: Callable[[Job], None] | None = None, timeout: float | None = None
    ) -> Job:
        return self._client.jobs.wait(self.id, progress=progress, timeout=timeout)

    def cancel(self) -> Job:
        return self._client.jobs.cancel(self.id)


class StorageDomains:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[models.StorageDomain]:
        return [
            models.StorageDomain.model_validate(x)
            for x in self._c.request("GET", "/storage_domains")
        ]

    def add(self, name: str, path: str, host: str | None = None) -> models.StorageDomain:
        """`host`: the one host that reaches it; None: shared by every host."""
        body = {"name": name, "path": path}
        if host is not None:
            body["host"] = host
        return models.StorageDomain.model_validate(
            self._c.request("POST", "/storage_domains", json=body)
        )

    def get(self, ref: str) -> models.StorageDomain:
        return models.StorageDomain.model_validate(
            self._c.request("GET", f"/storage_domains/{ref}")
        )

    def remove(self, ref: str) -> None:
        self._c.request("DELETE", f"/storage_domains/{ref}")


def disk_from_option(option: str | models.DiskCreate) -> dict[str, Any]:
    """A disk for the API from a CLI-style ``URL[,format=F][,storage=SD]`` string,
    or ``size=N[,storage=SD]`` for a blank disk (N in GiB, or with K, M, G, T).
    The engine validates it; only the option syntax is parsed here."""
    if isinstance(option, models.DiskCreate):
        return option.model_dump(mode="json", exclude_none=True)
    try:
        if is_blank_option(option):
            blank = parse_blank_option(option)
            return {"blank": {"virtual_size": blank.virtual_size}, "storage_domain": blank.storage}
        spec = parse_disk_option(option)
    except ThinairError as e:
        raise ThinairAPIError(400, e.code, e.message) from None
    return {
        "external_disk": {"url": spec.url, "format": spec.format},
        "storage_domain": spec.storage,
        "check_readonly": spec.check_readonly,
    }


# VMs read per request when listing them all (GET /vms?limit=, as GET /audit's
# default).
PAGE_SIZE = 100


class Vms:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _vm(self, data: Any) -> Vm:
        return Vm.model_validate(data)._bind(self._c)

    def list(self, page_size: int = PAGE_SIZE) -> builtins.list[Vm]:
        """Every VM, by name: read a page of `page_size` at a time."""
        vms: builtins.list[Vm] = []
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if vms:
                params["after"] = vms[-1].name
            page = [self._vm(x) for x in self._c.request("GET", "/vms", params=params)]
            if vms and page and page[0].id == vms[0].id:
                break  # an engine that does not page sent them all again
            vms += page
            if len(page) != page_size:  # the last page (or an engine that sends all)
                return vms
        return vms

    def get(self, ref: str) -> Vm:
        return self._vm(self._c.request("GET", f"/vms/{ref}"))

    def create(
        self,
        name: str | None,
        disks: Sequence[str | models.DiskCreate] = (),
        memory_mib: int | None = None,
        cpus: int | None = None,
        ova: str | None = None,
        storage_domain: str | None = None,
        host: str | None = None,
        convert: bool = False,
    ) -> Vm:
        """A VM on external (or blank) disks, or from an OVA (path or URL, as the
        engine sees it), whose OVF gives what is not given here; on `host`, or where
        the engine places it. With `convert`, virt-v2v runs in place over the
        temporary disks first: the VM comes back in phase `converting`;
        `vm.conversion().wait()` follows it (a failed conversion undoes the create)."""
        body: dict[str, Any] = {"name": name, "disks": [disk_from_option(d) for d in disks]}
        if convert:
            body["convert"] = True
        extra = {"memory_mib": memory_mib, "cpus": cpus, "ova": ova}
        extra["storage_domain"] = storage_domain
        extra["host"] = host
        body.update({k: v for k, v in extra.items() if v is not None})
        return self._vm(self._c.request("POST", "/vms", json=body))

    def start(self, ref: str, host: str | None = None) -> Vm:
        body = {"host": host} if host is not None else None
        return self._vm(self._c.request("POST", f"/vms/{ref}/start", json=body))

    def stop(self, ref: str, force: bool = False, timeout: float | None = None) -> Vm:
        body = {"force": force, "timeout": timeout}
        return self._vm(self._c.request("POST", f"/vms/{ref}/stop", json=body))

    def remove(self, ref: str, force: bool = False) -> None:
        self._c.request("DELETE", f"/vms/{ref}", params={"force": force})

    def rollback(self, ref: str) -> None:
        self._c.request("POST", f"/vms/{ref}/rollback")

    def import_(
        self,
        ref: str,
        to: str,
        strategy: str | None = None,
        bandwidth_mib: float | None = None,
        verify: str = "digest",
    ) -> Job:
        """Start making the VM's external disks local; returns the job at once
        (see Job.wait). verify="full" also compares each copy with its source."""
        body = {"to": to, "strategy": strategy, "bandwidth_mib": bandwidth_mib, "verify": verify}
        return self._c.jobs._job(self._c.request("POST", f"/vms/{ref}/import", json=body))

    def console(self, ref: str, offset: int = 0, wait: float = 0) -> models.Console:
        """The serial console from `offset` on; with `wait`, the engine answers
        once there is more (or after `wait` seconds)."""
        params: dict[str, Any] = {"offset": offset}
        if wait:
            params["wait"] = wait
        return models.Console.model_validate(
            self._c.request("GET", f"/vms/{ref}/console", params=params)
        )


class Hosts:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[models.Host]:
        return [models.Host.model_validate(x) for x in self._c.request("GET", "/hosts")]

    def get(self, name: str) -> models.Host:
        return models.Host.model_validate(self._c.request("GET", f"/hosts/{name}"))

    def add(self, name: str, libvirt_uri: str) -> models.Host:
        body = {"name": name, "libvirt_uri": libvirt_uri}
        return models.Host.model_validate(self._c.request("POST", "/hosts", json=body))

    def remove(self, name: str) -> None:
        self._c.request("DELETE", f"/hosts/{name}")


class Tokens:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[models.Token]:
        return [models.Token.model_validate(x) for x in self._c.request("GET", "/tokens")]

    def create(self, name: str, read_only: bool = False) -> models.TokenCreated:
        body = {"name": name, "read_only": read_only}
        return models.TokenCreated.model_validate(self._c.request("POST", "/tokens", json=body))

    def revoke(self, name: str) -> models.Token:
        return models.Token.model_validate(self._c.request("DELETE", f"/tokens/{name}"))


class Disks:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[models.Disk]:
        return [models.Disk.model_validate(x) for x in self._c.request("GET", "/disks")]

    def get(self, disk_id: str) -> models.Disk:
        return models.Disk.model_validate(self._c.request("GET", f"/disks/{disk_id}"))

    def find(self, vm: str, target: str) -> models.Disk:
        """A VM's disk by its target (vda), id or a unique prefix of its id."""
        disks = self._c.vms.get(vm).disks
        for disk in disks:
            if target in (disk.target, disk.id):
                return disk
        matches = [d for d in disks if len(target) >= 4 and d.id.startswith(target)]
        if len(matches) == 1:
            return matches[0]
        have = ", ".join(d.target for d in disks) or "none"
        raise ThinairAPIError(
            404, "not_found", f"VM {vm!r} has no disk {target!r} (its disks: {have})"
        )

    def probe(
        self, url: str, format: str | None = None, check_readonly: bool = True
    ) -> models.ProbeResult:
        """Ask an external disk's server what it holds (format, size), creating nothing."""
        body = {"url": url, "format": format, "check_readonly": check_readonly}
        return models.ProbeResult.model_validate(self._c.request("POST", "/probe", json=body))

    def move(
        self,
        disk_id: str,
        to: str,
        strategy: str | None = None,
        bandwidth_mib: float | None = None,
        verify: str = "digest",
    ) -> Job:
        """Move one disk to a storage domain: an external one is imported, a
        local one copied there while the VM runs."""
        body = {"to": to, "strategy": strategy, "bandwidth_mib": bandwidth_mib, "verify": verify}
        return self._c.jobs._job(self._c.request("POST", f"/disks/{disk_id}/move", json=body))


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _job(self, data: Any) -> Job:
        return Job.model_validate(data)._bind(self._c)

    def list(self, vm: str | None = None) -> builtins.list[Job]:
        params = {"vm": vm} if vm else {}
        return [self._job(x) for x in self._c.request("GET", "/jobs", params=params)]

    def get(self, job_id: str) -> Job:
        return self._job(self._c.request("GET", f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return self._job(self._c.request("POST", f"/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        progress: Callable[[Job], None] | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Follow the job (long-polling the engine) until it ends; `progress` is
        called with each new state. Returns the ended job; check its `state`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while True:
            if progress is not None:
                progress(job)
            if job.state not in JOB_ACTIVE:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ThinairAPIError(0, "timeout", f"job {job_id} still {job.state}")
            since = job.updated_at.isoformat()
            job = self._job(
                self._c.request("GET", f"/jobs/{job_id}", params={"wait": 10, "since": since})
            )


class Exports:
    """Read-only NBD/HTTP servers the engine runs for images (`thinair expose`)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[models.Export]:
        return [models.Export.model_validate(x) for x in self._c.request("GET", "/exports")]

    def create(
        self,
        image: str | None = None,
        format: str | None = None,
        name: str | None = None,
        protocol: str = "nbd",
        listen: str | None = None,
        unix: str | None = None,
        tls: str | None = None,
        tls_dir: str | None = None,
        shared: int = 16,
        vm: str | None = None,
        disk: str | None = None,
    ) -> models.Export:
        """Serve `image` (or a point-in-time copy of a running VM's disk) read-only
        until removed; see models.ExportCreate."""
        body = {
            "image": image,
            "vm": vm,
            "disk": disk,
            "format": format,
            "name": name,
            "protocol": protocol,
            "listen": listen,
            "unix": unix,
            "tls": tls,
            "tls_dir": tls_dir,
            "shared": shared,
        }
        return models.Export.model_validate(self._c.request("POST", "/exports", json=body))

    def get(self, ref: str) -> models.Export:
        return models.Export.model_validate(self._c.request("GET", f"/exports/{ref}"))

    def remove(self, ref: str) -> None:
        self._c.request("DELETE", f"/exports/{ref}")
