"""The `thinair` command line, built on the SDK (Typer + Rich).

Every command takes --json for machine-readable output; errors are one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from thinair.client import Client, ThinairAPIError
from thinair.config import Settings
from thinair.errors import InvalidInput, ThinairError
from thinair.external import is_blank_option

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Run virtual machines out of thin air."
)
storage_app = typer.Typer(no_args_is_help=True, help="Storage domains: where volumes live.")
vm_app = typer.Typer(no_args_is_help=True, help="Virtual machines.")
disk_app = typer.Typer(no_args_is_help=True, help="Disks of VMs.")
jobs_app = typer.Typer(invoke_without_command=True, help="Long operations (imports, moves).")
app.add_typer(storage_app, name="storage")
app.add_typer(vm_app, name="vm")
app.add_typer(disk_app, name="disk")
app.add_typer(jobs_app, name="jobs")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
app.add_typer(token_app, name="token")
host_app = typer.Typer(no_args_is_help=True, help="libvirt hosts.")
backup_app = typer.Typer(
    no_args_is_help=True,
    help="Backups: run a VM from one to look at it, then restore it or discard it.",
)
app.add_typer(backup_app, name="backup")
app.add_typer(host_app, name="host")

out = Console()
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Print the job id and return.")]
OvaOpt = Annotated[
    str | None,
    typer.Option(help="An OVA (path or http(s) URL): its OVF gives disks, name, memory, CPUs."),
]
ConvertOpt = Annotated[
    bool,
    typer.Option(
        "--convert",
        help="Run virt-v2v in place over the temporary disks first (a foreign guest "
        "gets virtio drivers); takes minutes. Its log: THINAIR_HOME/v2v/NAME.log.",
    ),
]


@contextmanager
def _errors() -> Iterator[None]:
    """One clear line and exit status 1 for any error the engine or input gives."""
    try:
        yield
    except ThinairAPIError as e:
        err.print(f"[red]error:[/red] {e.message}", highlight=False)
        raise typer.Exit(1) from None
    except ThinairError as e:
        err.print(f"[red]error:[/red] {e.message}", highlight=False)
        raise typer.Exit(1) from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        err.print(f"[red]error:[/red] {problems}", highlight=False)
        raise typer.Exit(1) from None


def _emit(
    data: BaseModel | list[Any] | dict[str, Any] | None, as_json: bool, render: Callable[[], None]
) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            print(data.model_dump_json(indent=2))
        elif isinstance(data, list):
            print(
                json.dumps(
                    [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in data],
                    indent=2,
                )
            )
        else:
            print(json.dumps(data, indent=2))
    else:
        render()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return str(n)


# -- engine ------------------------------------------------------------------


@app.command()
def engine(
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to serve the API on.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the engine (REST API and jobs) in the foreground."""
    import uvicorn

    from thinair.api.app import create_app

    settings = Settings.load()
    if listen:
        settings = Settings.load({**os.environ, "THINAIR_LISTEN": listen})
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        err.print("[red]error:[/red] HTTPS needs both THINAIR_TLS_CERT and THINAIR_TLS_KEY")
        raise typer.Exit(1)
    uvicorn.run(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level=log_level,
        access_log=log_level == "debug",
    )


# -- storage -----------------------------------------------------------------


@storage_app.command("add")
def storage_add(
    name: str,
    path: str,
    host: Annotated[
        str | None,
        typer.Option(help="The one host that reaches it; without: shared by every host."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a storage domain: an existing directory thinair keeps volumes in."""
    with _errors():
        sd = Client().storage_domains.add(name, os.path.abspath(path) if path else path, host=host)
    where = f"local to host {sd.host}" if sd.host else "shared"
    _emit(sd, as_json, lambda: out.print(f"storage domain {sd.name} at {sd.path} ({where})"))


@storage_app.command("list")
def storage_list(as_json: JsonOpt = False) -> None:
    """List storage domains with their free space."""
    with _errors():
        domains = Client().storage_domains.list()

    def render() -> None:
        table = Table("NAME", "PATH", "FREE", "SIZE", "HOSTS", box=None)
        for sd in domains:
            table.add_row(
                sd.name,
                sd.path,
                _size(sd.free_bytes),
                _size(sd.total_bytes),
                sd.host or "all (shared)",
            )
        out.print(table)

    _emit(domains, as_json, render)


@storage_app.command("remove")
def storage_remove(name: str, as_json: JsonOpt = False) -> None:
    """Forget a storage domain that holds no volumes (its directory stays)."""
    with _errors():
        Client().storage_domains.remove(name)
    _emit({"removed": name}, as_json, lambda: out.print(f"removed storage domain {name}"))


# -- vm ----------------------------------------------------------------------


def _absolute_disk(option: str) -> str:
    """A relative local path is relative to where the user stands, not the engine."""
    if is_blank_option(option):
        return option
    url = option.split(",", 1)[0]
    if "://" not in url and not url.startswith("/"):
        return os.path.abspath(url) + option[len(url) :]
    return option


def _render_vm(vm: Any) -> None:
    out.print(
        f"[bold]{vm.name}[/bold]  {vm.state}  {vm.memory_mib} MiB  {vm.cpus} CPU  "
        f"({vm.domain_type})  id {vm.id}",
        highlight=False,
    )
    if vm.last_start_seconds is not None:
        out.print(f"last start took {vm.last_start_seconds:.2f} s")
    table = Table("DISK", "DATA", "SIZE", box=None)
    table.add_column("VOLUME", overflow="fold")
    table.add_column("EXTERNAL", overflow="fold")
    for d in vm.disks:
        ext = f"{d.external_disk.url} ({d.external_disk.format})" if d.external_disk else "-"
        table.add_row(
            d.target,
            "local (blank)" if d.blank else d.location,
            _size(d.virtual_size),
            f"{d.storage_domain}:{d.volume_path}",
            ext,
        )
    out.print(table)


@vm_app.command("create")
def vm_create(
    name: Annotated[
        str | None, typer.Argument(help="The VM's name (from the OVF with --ova).")
    ] = None,
    disk: Annotated[
        list[str] | None,
        typer.Option(
            "--disk",
            help="URL[,format=F][,storage=SD][,check-readonly=off] for an external disk, or "
            "size=N[,storage=SD] for a blank one (N in GiB as virt-install, or 512M, 2T...); "
            "repeat for more",
        ),
    ] = None,
    ova: OvaOpt = None,
    storage: Annotated[
        str | None, typer.Option(help="With --ova: storage domain for the temporary disks.")
    ] = None,
    memory: Annotated[int | None, typer.Option(help="Memory in MiB [default: 512].")] = None,
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs [default: 1].")] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Host to define it on; without: one that reaches its storage."),
    ] = None,
    convert: ConvertOpt = False,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM whose disks are temporary overlays on external disks (or on
    the disks inside an OVA, read in place), and blank disks made with it."""
    with _errors():
        client = Client()
        vm = client.vms.create(
            name,
            [_absolute_disk(d) for d in disk or []],
            memory_mib=memory,
            cpus=cpus,
            ova=_absolute_disk(ova) if ova else None,
            storage_domain=storage,
            host=host,
            convert=convert,
        )
        if convert:
            _follow_conversion(client, vm, as_json, no_wait)
            if no_wait:
                return
            vm = client.vms.get(vm.id)
    _emit(vm, as_json, lambda: _render_vm(vm))


def _follow_conversion(client: Client, vm: Any, as_json: bool, no_wait: bool) -> None:
    """Follow a new VM's conversion job (virt-v2v's steps, one a line); exits 1
    when it failed (the create was undone)."""
    job = vm.conversion()
    if job is None:  # it ended and went already: the VM says how
        return
    if not as_json and out.is_terminal and not no_wait:
        out.print(f"{vm.name}: converting with virt-v2v (job {job.id}); this takes minutes")
    _follow(client, job, as_json, no_wait)


@vm_app.command("start")
def vm_start(
    name: str,
    host: Annotated[
        str | None, typer.Option(help="Start it on this host (a stopped VM moves there).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a VM: it runs at once, reading its external disks over the network."""
    with _errors():
        vm = Client().vms.start(name, host=host)
    _emit(
        vm,
        as_json,
        lambda: out.print(
            f"{vm.name} is {vm.state} on {vm.host} (started in {vm.last_start_seconds:.2f} s)"
        ),
    )


@vm_app.command("stop")
def vm_stop(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Power off at once.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the guest.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Shut a VM down (ACPI), or power it off with --force."""
    with _errors():
        vm = Client().vms.stop(name, force=force, timeout=timeout)
    _emit(vm, as_json, lambda: out.print(f"{vm.name} is {vm.state}"))


@vm_app.command("show")
def vm_show(name: str, as_json: JsonOpt = False) -> None:
    """Show a VM and where each disk's data lives."""
    with _errors():
        vm = Client().vms.get(name)
    _emit(vm, as_json, lambda: _render_vm(vm))


@vm_app.command("list")
def vm_list(as_json: JsonOpt = False) -> None:
    """List VMs."""
    with _errors():
        vms = Client().vms.list()

    def render() -> None:
        table = Table("NAME", "STATE", "MEMORY", "CPUS", "DISKS", box=None)
        for vm in vms:
            disks = ", ".join(f"{d.target}:{d.location}" for d in vm.disks)
            table.add_row(vm.name, vm.state, f"{vm.memory_mib} MiB", str(vm.cpus), disks)
        out.print(table)

    _emit(vms, as_json, render)


@vm_app.command("remove")
def vm_remove(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Power off a running VM first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a VM and every volume thinair created for it."""
    with _errors():
        Client().vms.remove(name, force=force)
    _emit({"removed": name}, as_json, lambda: out.print(f"removed {name}"))


@vm_app.command("rollback")
def vm_rollback(name: str, as_json: JsonOpt = False) -> None:
    """Stop a VM and discard its temporary disks; the external disks stay untouched."""
    with _errors():
        Client().vms.rollback(name)
    _emit(
        {"rolled_back": name},
        as_json,
        lambda: out.print(f"rolled back {name}: VM, domain and temporary disks are gone"),
    )


@vm_app.command("console")
def vm_console(
    name: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the guest's serial console so far (--follow keeps following)."""
    with _errors():
        client = Client()
        chunk = client.vms.console(name)
        if as_json and not follow:
            print(chunk.model_dump_json())
            return
        offset = chunk.offset
        _write_console(chunk.text, as_json, offset)
        while follow:
            chunk = client.vms.console(name, offset, wait=CONSOLE_WAIT)
            if chunk.offset < offset:  # the VM restarted: its log began anew
                offset = 0
            offset = chunk.offset
            _write_console(chunk.text, as_json, offset)


CONSOLE_WAIT = 25.0  # seconds the engine holds a console read while nothing comes


def _write_console(text: str, as_json: bool, offset: int) -> None:
    if not text:
        return
    if as_json:
        print(json.dumps({"text": text, "offset": offset}), flush=True)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# -- import, move and jobs ------------------------------------------------------

StrategyOpt = Annotated[
    str | None,
    typer.Option(
        "--strategy",
        help="stream (keep the temporary disk) or mirror (copy to a new volume); "
        "by default stream where the temporary disk is on the target already",
    ),
]
BandwidthOpt = Annotated[float | None, typer.Option("--bandwidth", help="MiB/s limit.")]


def _follow(client: Client, job: Any, as_json: bool, no_wait: bool) -> None:
    """Follow a job to its end: a progress bar on a terminal, JSON lines otherwise.
    Exits 1 when the job did not succeed."""
    if no_wait:
        _emit(
            job,
            as_json,
            lambda: out.print(
                f"job {job.id} started; follow it with `thinair jobs watch {job.id}`"
            ),
        )
        return
    if as_json or not out.is_terminal:

        def show(j: Any) -> None:
            print(j.model_dump_json(), flush=True)

        final = client.jobs.wait(job.id, progress=show)
    else:
        final = _progress_bar(client, job.id)
    if final.state != "succeeded":
        err.print(
            f"[red]error:[/red] job {final.id} {final.state}"
            + (f": {final.error}" if final.error else ""),
            highlight=False,
        )
        raise typer.Exit(1)
    if not as_json and out.is_terminal:
        out.print(f"job {final.id} succeeded in {final.progress.get('elapsed', 0):.1f} s")


def _progress_bar(client: Client, job_id: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out) as bar:
        tasks: dict[str, Any] = {}

        def show(j: Any) -> None:
            disks = j.progress.get("disks", {})
            for target, d in disks.items():
                if target not in tasks:
                    tasks[target] = bar.add_task(target, total=d["total"])
                bar.update(
                    tasks[target],
                    completed=d["done"],
                    total=d["total"],
                    description=f"{target} {j.step or j.state}",
                )
            if len(disks) > 1:
                if "total" not in tasks:
                    tasks["total"] = bar.add_task("total", total=j.progress.get("total"))
                bar.update(
                    tasks["total"],
                    completed=j.progress.get("done", 0),
                    total=j.progress.get("total"),
                )

        return client.jobs.wait(job_id, progress=show)


@vm_app.command("import")
def vm_import(
    name: str,
    to: Annotated[str, typer.Option("--to", help="Target storage domain.")],
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Make every external disk of a VM local, while it runs (or stopped)."""
    with _errors():
        client = Client()
        job = client.vms.import_(name, to=to, strategy=strategy, bandwidth_mib=bandwidth)
        _follow(client, job, as_json, no_wait)


@backup_app.command("preview")
def backup_preview(
    backups: Annotated[
        list[str],
        typer.Argument(
            help="The backup's disks (path or URL, as for --disk; a qcow2 chain of "
            "incremental backups is read through its top)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="The preview VM's name.")],
    storage: Annotated[
        str | None, typer.Option(help="Storage domain for the throw-away overlays.")
    ] = None,
    memory: Annotated[int | None, typer.Option(help="Memory in MiB [default: 512].")] = None,
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs [default: 1].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a VM from a backup: the backup is only read, the guest's writes go to
    a throw-away overlay. Then `backup restore NAME --to SD` keeps it, or
    `vm rollback NAME` discards it."""
    with _errors():
        client = Client()
        disks = [_absolute_disk(b) for b in backups]
        if storage:
            disks = [d if ",storage=" in d else f"{d},storage={storage}" for d in disks]
        client.vms.create(name, disks, memory_mib=memory, cpus=cpus)
        try:
            vm = client.vms.start(name)
        except ThinairAPIError:
            client.vms.rollback(name)
            raise
    _emit(vm, as_json, lambda: _render_vm(vm))


@backup_app.command("restore")
def backup_restore(
    name: str,
    to: Annotated[str, typer.Option("--to", help="Storage domain to restore to.")],
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep a previewed backup: copy its disks, with the guest's writes, to local
    storage while it runs (an import)."""
    vm_import(name, to, strategy, bandwidth, no_wait, as_json)


@disk_app.command("move")
def disk_move(
    vm: str,
    disk: Annotated[str, typer.Argument(help="Target (vda) or disk id.")],
    to: Annotated[str, typer.Option("--to", help="Target storage domain.")],
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Make one disk of a VM local (oVirt's "move")."""
    with _errors():
        client = Client()
        found = client.disks.find(vm, disk)
        job = client.disks.move(found.id, to=to, strategy=strategy, bandwidth_mib=bandwidth)
        _follow(client, job, as_json, no_wait)


@app.command("quick-import")
def quick_import(
    to: Annotated[str, typer.Option("--to", help="Storage domain for the disks.")],
    urls: Annotated[list[str] | None, typer.Argument(help="External disks, as for --disk.")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The VM's name (from the OVF with --ova).")
    ] = None,
    ova: OvaOpt = None,
    memory: Annotated[int | None, typer.Option(help="Memory in MiB [default: 512].")] = None,
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs [default: 1].")] = None,
    convert: ConvertOpt = False,
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM on external disks (or an OVA), convert it if asked, start it,
    and import it, in one go."""
    with _errors():
        if bool(urls) == bool(ova):
            raise InvalidInput("give either disk URLs or --ova")
        if name is None and not ova:
            raise InvalidInput("--name is required (unless --ova gives it)")
        client = Client()
        disks = [
            _absolute_disk(u) if ",storage=" in u else f"{_absolute_disk(u)},storage={to}"
            for u in urls or []
        ]
        began = time.monotonic()
        vm = client.vms.create(
            name,
            disks,
            memory_mib=memory,
            cpus=cpus,
            ova=_absolute_disk(ova) if ova else None,
            storage_domain=to if ova else None,
            convert=convert,
        )
        if convert:
            _follow_conversion(client, vm, as_json, no_wait=False)
        vm = client.vms.start(vm.id)
        if not as_json:
            out.print(f"{vm.name} is {vm.state} after {time.monotonic() - began:.1f} s; importing")
        job = client.vms.import_(vm.id, to=to, strategy=strategy, bandwidth_mib=bandwidth)
        _follow(client, job, as_json, no_wait)


def _render_jobs(jobs: list[Any]) -> None:
    table = Table("ID", "KIND", "STATE", "STEP", "DONE", "ERROR", box=None)
    for j in jobs:
        done = j.progress.get("done")
        total = j.progress.get("total")
        pct = f"{100 * done / total:.0f}%" if done is not None and total else "-"
        table.add_row(j.id, j.kind, j.state, j.step, pct, j.error or "")
    out.print(table)


@jobs_app.callback()
def jobs_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List jobs (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    with _errors():
        jobs = Client().jobs.list()
    _emit(jobs, as_json, lambda: _render_jobs(jobs))


@jobs_app.command("watch")
def jobs_watch(job_id: str, as_json: JsonOpt = False) -> None:
    """Follow a job until it ends."""
    with _errors():
        client = Client()
        _follow(client, client.jobs.get(job_id), as_json, no_wait=False)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a job: the VM goes on running on its temporary disks."""
    with _errors():
        job = Client().jobs.cancel(job_id)
    _emit(job, as_json, lambda: out.print(f"cancelling job {job.id}"))


# -- hosts ---------------------------------------------------------------------


@host_app.command("list")
def host_list(as_json: JsonOpt = False) -> None:
    """List the libvirt hosts the engine drives."""
    with _errors():
        hosts = Client().hosts.list()

    def render() -> None:
        table = Table(
            "NAME", "URI", "HYPERVISOR", "CPUS", "MEMORY", "FREE", "DOMAINS", "VMS", box=None
        )
        for h in hosts:
            if not h.reachable:
                table.add_row(h.name, h.libvirt_uri, f"unreachable: {h.error}", *"----", str(h.vms))
                continue
            table.add_row(
                h.name,
                h.libvirt_uri,
                f"{h.hypervisor} {h.hypervisor_version}",
                str(h.cpus),
                f"{h.memory_mib} MiB",
                f"{h.free_memory_mib} MiB",
                h.domain_type,
                str(h.vms),
            )
        out.print(table)

    _emit(hosts, as_json, render)


def _render_host(h: Any) -> None:
    out.print(f"[bold]{h.name}[/bold]  {h.libvirt_uri}  id {h.id}", highlight=False)
    if not h.reachable:
        out.print(f"unreachable: {h.error}", highlight=False)
    else:
        out.print(
            f"{h.hypervisor} {h.hypervisor_version}, {h.cpus} CPU, {h.memory_mib} MiB "
            f"({h.free_memory_mib} MiB free), domains {h.domain_type}, {h.vms} VM(s)",
            highlight=False,
        )


@host_app.command("add")
def host_add(name: str, uri: str, as_json: JsonOpt = False) -> None:
    """Register a libvirt host: qemu+ssh://, qemu+tls://, qemu+tcp:// or qemu:///system."""
    with _errors():
        host = Client().hosts.add(name, uri)
    _emit(host, as_json, lambda: _render_host(host))


@host_app.command("show")
def host_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one host: its hypervisor, memory and VMs."""
    with _errors():
        host = Client().hosts.get(name)
    _emit(host, as_json, lambda: _render_host(host))


@host_app.command("remove")
def host_remove(name: str, as_json: JsonOpt = False) -> None:
    """Forget a host that has no VMs and no storage domain of its own."""
    with _errors():
        Client().hosts.remove(name)
    _emit({"removed": name}, as_json, lambda: out.print(f"removed host {name}"))


# -- tokens --------------------------------------------------------------------


@token_app.command("create")
def token_create(
    name: str,
    read_only: Annotated[bool, typer.Option("--read-only", help="May only read.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; its secret is printed this once."""
    with _errors():
        token = Client().tokens.create(name, read_only=read_only)
    _emit(token, as_json, lambda: print(token.token))


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """List API tokens (never their secrets)."""
    with _errors():
        tokens = Client().tokens.list()

    def render() -> None:
        table = Table("NAME", "ACCESS", "CREATED", "REVOKED", box=None)
        for t in tokens:
            table.add_row(
                t.name,
                "read-only" if t.read_only else "read-write",
                t.created_at.strftime("%Y-%m-%d %H:%M"),
                t.revoked_at.strftime("%Y-%m-%d %H:%M") if t.revoked_at else "-",
            )
        out.print(table)

    _emit(tokens, as_json, render)


@token_app.command("revoke")
def token_revoke(name: str, as_json: JsonOpt = False) -> None:
    """Revoke an API token: it stops working at once."""
    with _errors():
        token = Client().tokens.revoke(name)
    _emit(token, as_json, lambda: out.print(f"revoked token {token.name}"))


# -- audit ---------------------------------------------------------------------


@app.command()
def audit(
    limit: Annotated[int, typer.Option("--limit", help="Entries shown, newest first.")] = 50,
    token: Annotated[str | None, typer.Option("--token", help="Only this token's.")] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="Only this action (create_vm, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Who asked the engine for what change, from where, and how it ended
    (an admin token only)."""
    with _errors():
        entries = Client().audit(limit=limit, token=token, action=action)

    def render() -> None:
        table = Table("TIME", "TOKEN", "CLIENT", "ACTION", "TARGET", "OUTCOME", box=None)
        for e in entries:
            outcome = e.outcome if e.outcome == "ok" else f"{e.outcome} ({e.status})"
            if e.message:
                outcome += f": {e.message[:80]}"
            cells = [e.at.strftime("%Y-%m-%d %H:%M:%S"), e.token, e.client, e.action]
            # Text, not markup: a target or message may hold anything a client sent.
            table.add_row(*(Text(c or "-") for c in [*cells, e.target, outcome]))
        out.print(table, highlight=False)

    _emit(entries, as_json, render)


# -- exports -------------------------------------------------------------------


def _render_export(e: Any) -> None:
    print(e.url)
    details = [f"{e.protocol} export {e.name} of {e.image} ({e.format}), id {e.id}"]
    if e.psk_file:
        details.append(f"PSK identity {e.tls_username}, key file {e.psk_file}")
    if e.ca_cert:
        details.append(f"CA certificate {e.ca_cert}")
    if e.tls_certificates:
        details.append(f"client certificates in {e.tls_certificates}")
    for line in details:
        err.print(line, highlight=False)


@app.command()
def expose(
    image: Annotated[str | None, typer.Argument(help="Image file or device.")] = None,
    vm: Annotated[
        str | None,
        typer.Option("--vm", help="Expose a running VM's disk as it is now, instead."),
    ] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="The VM's disk (vda).")] = None,
    format: Annotated[str | None, typer.Option("--format", help="Probed when omitted.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Export name.")] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="HOST:PORT (127.0.0.1, a free port).")
    ] = None,
    unix: Annotated[str | None, typer.Option("--unix", help="Unix socket path instead.")] = None,
    tls: Annotated[
        str | None,
        typer.Option("--tls", help="none, psk or x509; psk by default off loopback."),
    ] = None,
    tls_dir: Annotated[
        str | None, typer.Option("--tls-dir", help="Use these credentials, not new ones.")
    ] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="nbd or http.")] = "nbd",
    shared: Annotated[int, typer.Option("--shared", help="Clients served at once.")] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Serve an image read-only over NBD (or HTTP) until `unexpose`; prints its URL.
    With --vm, a point-in-time copy of a running VM's disk: the guest goes on
    writing to a new overlay, merged back by `unexpose`."""
    with _errors():
        export = Client().exports.create(
            os.path.abspath(image) if image else None,
            vm=vm,
            disk=disk,
            format=format,
            name=name,
            listen=listen,
            unix=os.path.abspath(unix) if unix else None,
            tls=tls,
            tls_dir=os.path.abspath(tls_dir) if tls_dir else None,
            protocol=protocol,
            shared=shared,
        )
    _emit(export, as_json, lambda: _render_export(export))
    if export.warning:
        err.print(f"[yellow]warning:[/yellow] {export.warning}", highlight=False)


@app.command("exports")
def exports_list(as_json: JsonOpt = False) -> None:
    """List exports, their clients and the bytes they served."""
    with _errors():
        exports = Client().exports.list()

    def render() -> None:
        table = Table("ID", "NAME", "STATE", "TLS", "CLIENTS", "READ", box=None)
        table.add_column("URL", overflow="fold")
        for e in exports:
            clients = "-" if e.clients is None else str(e.clients)
            state = f"{e.state}: {e.error}" if e.error and e.state != "running" else e.state
            table.add_row(e.id, e.name, state, e.tls, clients, _size(e.bytes_read), e.url)
        out.print(table)
        for e in exports:
            if e.warning:
                err.print(f"[yellow]warning:[/yellow] {e.name}: {e.warning}", highlight=False)

    _emit(exports, as_json, render)


@app.command()
def unexpose(
    export: Annotated[str, typer.Argument(help="Export id or name.")], as_json: JsonOpt = False
) -> None:
    """Stop an export: its server, keys and files are gone (a VM's disk is merged
    back into its volume)."""
    with _errors():
        Client().exports.remove(export)
    _emit({"removed": export}, as_json, lambda: out.print(f"stopped export {export}"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
