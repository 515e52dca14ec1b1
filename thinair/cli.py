"""The `thinair` command line, built on the SDK (Typer + Rich).

Every command takes --json for machine-readable output; errors are one line on
stderr (a JSON object with --json) and a non-zero exit status. Piped, tables are
one row per line with full values and no trailing spaces (as `virsh list`); on a
terminal they fit its width without cutting IDs, URLs or paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from typer.core import TyperArgument, TyperCommand

from thinair.client import Client, ThinairAPIError
from thinair.config import Settings
from thinair.errors import InvalidInput, ThinairError
from thinair.external import is_blank_option
from thinair.states import JOB_ACTIVE, VmState

# Plain click help (rich_markup_mode=None): no boxes, no <bool> tags, "[default: 512]"
# kept (Rich markup ate it), paragraphs re-wrapped to the terminal's width.
HELP = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}

app = typer.Typer(
    no_args_is_help=True,
    help="Run virtual machines out of thin air.",
    rich_markup_mode=None,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)
storage_app = typer.Typer(
    no_args_is_help=True,
    help="Storage domains: where volumes live.",
    **HELP,  # type: ignore[arg-type]
)
vm_app = typer.Typer(no_args_is_help=True, help="Virtual machines.", **HELP)  # type: ignore[arg-type]
disk_app = typer.Typer(no_args_is_help=True, help="Disks of VMs.", **HELP)  # type: ignore[arg-type]
jobs_app = typer.Typer(
    invoke_without_command=True,
    help="Long operations (imports, moves, conversions): the task log.",
    **HELP,  # type: ignore[arg-type]
)
app.add_typer(storage_app, name="storage")
app.add_typer(vm_app, name="vm")
app.add_typer(disk_app, name="disk")
app.add_typer(jobs_app, name="jobs")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.", **HELP)  # type: ignore[arg-type]
app.add_typer(token_app, name="token")
host_app = typer.Typer(no_args_is_help=True, help="libvirt hosts.", **HELP)  # type: ignore[arg-type]
backup_app = typer.Typer(
    no_args_is_help=True,
    help="Backups: run a VM from one to look at it, then restore it or discard it.",
    **HELP,  # type: ignore[arg-type]
)
app.add_typer(backup_app, name="backup")
app.add_typer(host_app, name="host")

# soft_wrap: a message piped is one line whatever its length (a hint's command is
# never split); a terminal wraps it itself.
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        from thinair import __version__

        print(f"thinair {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run virtual machines out of thin air."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Print the job id and return.")]
MemoryOpt = Annotated[
    int | None,
    typer.Option(metavar="MiB", help="Memory in MiB (with --ova: the OVF's) [default: 512]."),
]
CpusOpt = Annotated[
    int | None,
    typer.Option(metavar="N", help="Virtual CPUs (with --ova: the OVF's) [default: 1]."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
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


# The API's field names as this CLI spells them.
OPTIONS = {
    "bandwidth_mib": "--bandwidth",
    "memory_mib": "--memory",
    "cpus": "--cpus",
    "name": "NAME",
    "disks": "--disk",
    "to": "--to",
    "strategy": "--strategy",
    "timeout": "--timeout",
    "ova": "--ova",
    "storage_domain": "--storage",
    "shared": "--shared",
    "tls": "--tls",
    "listen": "--listen",
    "protocol": "--protocol",
    "path": "PATH",
    "libvirt_uri": "URI",
}
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def cli_words(message: str) -> str:
    """An engine's validation message ("bandwidth_mib: Input should be greater
    than 0") in the words of this CLI ("--bandwidth must be greater than 0")."""
    parts = []
    for part in message.split("; "):
        field, sep, problem = part.partition(": ")
        if not sep or not re.fullmatch(r"[\w.]+", field):
            parts.append(part)
            continue
        leaf = [p for p in field.split(".") if not p.isdigit()]
        option = OPTIONS.get(leaf[-1] if leaf else field) or OPTIONS.get(field.split(".")[0])
        if option is None:
            option = "--disk" if field.startswith("disks") else field
        problem = problem.removeprefix("Value error, ")
        if problem.startswith("String should match pattern"):
            problem = f"must be {NAME_RULE}"
        problem = re.sub(r"^(Input|String|List|Value) should (be|have)", r"must \2", problem)
        parts.append(f"{option} {problem}")
    return "; ".join(parts)


def _fail(message: str, code: str, as_json: bool) -> None:
    if as_json:
        err.print(json.dumps({"error": {"code": code, "message": message}}), markup=False)
    else:
        err.print("[red]error:[/red] ", end="")
        err.print(message, markup=False)
    raise typer.Exit(1)


@contextmanager
def _errors(as_json: bool = False) -> Iterator[None]:
    """One clear line and exit status 1 for any error the engine or input gives;
    with --json, that line is {"error": {"code": ..., "message": ...}}."""
    try:
        yield
    except ThinairAPIError as e:
        message = cli_words(e.message) if e.code == "invalid_input" else e.message
        _fail(message, e.code, as_json)
    except ThinairError as e:
        _fail(e.message, e.code, as_json)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        _fail(cli_words(problems), "invalid_input", as_json)


def _on_terminal() -> bool:
    return out.is_terminal


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], keep: Sequence[str] = ()) -> None:
    """Print rows as aligned columns (two spaces apart, as `virsh list`), no
    padding at the end. Piped: full values, one row per line. On a terminal
    narrower than the rows: the columns not in `keep` wrap at word boundaries
    (down to their header's width); those in `keep` (IDs, URLs, paths: what
    users copy) are never cut nor wrapped, and where they alone are too wide
    the terminal wraps the line, not the value."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if _on_terminal():
        _fit(headers, cells, widths, keep, out.width - 2 * (len(headers) - 1))
    lines: list[list[str]] = [list(headers)]
    for row in cells:
        wrapped = [
            textwrap.wrap(c, w, break_on_hyphens=False) or [""] if len(c) > w else [c]
            for c, w in zip(row, widths, strict=True)
        ]
        lines += [
            [col[i] if i < len(col) else "" for col in wrapped]
            for i in range(max(map(len, wrapped)))
        ]
    for n, line in enumerate(lines):
        text = "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        if n == 0 and _on_terminal():
            out.print(text, style="bold", markup=False)
        else:
            out.print(text, markup=False)


def _fit(
    headers: Sequence[str],
    cells: list[list[str]],
    widths: list[int],
    keep: Sequence[str],
    room: int,
) -> None:
    """Narrow the wrappable columns (never below their header or longest word)
    until the rows fit in `room`; where they cannot fit, leave every column whole."""
    least = [
        w if h in keep else max([len(h)] + [len(word) for r in cells for word in r[i].split()])
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    ]
    if sum(least) > room:
        return
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: widths[i] - least[i])
        widths[widest] -= 1


def _when(dt: datetime | None) -> str:
    """A time as the API gives it: UTC, with the zone (one word, for awk)."""
    if dt is None:
        return "-"
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _rate(job: Any) -> str:
    """The rate of bytes copied in MiB/s (the unit of the sizes), with the limit."""
    rate = job.progress.get("rate")
    limit = (job.params or {}).get("bandwidth")
    shown = f"{rate / 2**20:.1f} MiB/s" if rate is not None else "-"
    return f"{shown} (limit {limit / 2**20:g} MiB/s)" if limit else shown


def _confirm(question: str, yes: bool, as_json: bool) -> None:
    """Ask on a terminal; scripts (stdin not a terminal, or --json) and --yes go on."""
    if yes or as_json or not sys.stdin.isatty():
        return
    if not typer.confirm(question, default=False, err=True):
        err.print("nothing done")
        raise typer.Exit(1)


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
    """Run the engine (REST API and jobs) in the foreground: one per THINAIR_HOME."""
    from thinair.api import service

    settings = Settings.load()
    if listen:
        settings = Settings.load({**os.environ, "THINAIR_LISTEN": listen})
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        err.print("[red]error:[/red] HTTPS needs both THINAIR_TLS_CERT and THINAIR_TLS_KEY")
        raise typer.Exit(1)
    with _errors():
        service.run(settings, log_level)


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
    with _errors(as_json):
        sd = Client().storage_domains.add(name, os.path.abspath(path) if path else path, host=host)
    where = f"local to host {sd.host}" if sd.host else "shared"
    _emit(sd, as_json, lambda: out.print(f"storage domain {sd.name} at {sd.path} ({where})"))


@storage_app.command("list")
def storage_list(as_json: JsonOpt = False) -> None:
    """List storage domains with their free space."""
    with _errors(as_json):
        domains = Client().storage_domains.list()

    def render() -> None:
        rows = [
            (sd.name, sd.path, _size(sd.free_bytes), _size(sd.total_bytes), sd.host or "all")
            for sd in domains
        ]
        _table(("NAME", "PATH", "FREE", "SIZE", "HOSTS"), rows, keep=("NAME", "PATH"))

    _emit(domains, as_json, render)


@storage_app.command("remove")
def storage_remove(name: str, as_json: JsonOpt = False) -> None:
    """Forget a storage domain that holds no volumes (its directory stays)."""
    with _errors(as_json):
        Client().storage_domains.remove(name)
    _emit({"removed": name}, as_json, lambda: out.print(f"removed storage domain {name}"))


# -- vm ----------------------------------------------------------------------


def _absolute_disk(option: str) -> str:
    """A relative local path is relative to where the user stands, not the engine.
    A URL with a scheme but no "//" (nbd:/host:10899/x) is left for the engine
    to refuse as a URL, not taken for a file name."""
    if is_blank_option(option):
        return option
    url = option.split(",", 1)[0]
    if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.IGNORECASE) and not os.path.exists(url):
        return option
    if "://" not in url and not url.startswith("/"):
        return os.path.abspath(url) + option[len(url) :]
    return option


def _where(d: Any, job: Any = None) -> str:
    """Where a disk's data is: external, copying N% (an import of it runs), local."""
    if d.blank:
        return "local (blank)"
    if d.location == "external" and job is not None and d.id in (job.params.get("disks") or []):
        p = job.progress.get("disks", {}).get(d.target)
        pct = int(100 * p["done"] / p["total"]) if p and p.get("total") else 0
        return f"copying {pct}%"
    return str(d.location)


def _active_jobs(client: Client) -> dict[str, Any]:
    return {j.vm_id: j for j in client.jobs.list() if j.vm_id and j.state in JOB_ACTIVE}


def _render_vm(vm: Any, job: Any = None) -> None:
    out.print(f"[bold]{vm.name}[/bold]  ", end="")
    out.print(
        f"{vm.state}  {vm.memory_mib} MiB  {vm.cpus} CPU  ({vm.domain_type})  on {vm.host}  "
        f"id {vm.id}  created {_when(vm.created_at)}",
        markup=False,
    )
    if vm.pause_reason:
        out.print(vm.pause_reason, highlight=False, markup=False)
    if vm.last_start_seconds is not None:
        out.print(f"last start took {vm.last_start_seconds:.2f} s")
    if job is not None:
        out.print(f"{job.kind} job {job.id}: {job.step or job.state}, {_rate(job)}", markup=False)
    rows = [
        (
            d.target,
            _where(d, job),
            _size(d.virtual_size),
            f"{d.storage_domain}:{d.volume_path}",
            f"{d.external_disk.url} ({d.external_disk.format})" if d.external_disk else "-",
        )
        for d in vm.disks
    ]
    _table(("DISK", "DATA", "SIZE", "VOLUME", "EXTERNAL"), rows, keep=("VOLUME", "EXTERNAL"))


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
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
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
    with _errors(as_json):
        if not disk and not ova:
            raise InvalidInput("give --disk URL (repeat it for more disks) or --ova OVA")
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
    with _errors(as_json):
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
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for the guest to power off after the ACPI shutdown "
            "[default: the engine's THINAIR_STOP_TIMEOUT, 60].",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Shut a VM down as virsh shutdown does (ACPI: the guest powers itself off),
    waiting until it is off; or power it off at once with --force (virsh destroy)."""
    with _errors(as_json):
        if timeout is not None and timeout <= 0:
            raise InvalidInput("--timeout must be greater than 0")
        client = Client()
        if force or as_json:
            vm = client.vms.stop(name, force=force, timeout=timeout)
        else:
            limit = f"{timeout:g} s" if timeout else "the engine's stop timeout (60 s by default)"
            waiting = (
                f"waiting for {name} to power off after an ACPI shutdown, up to {limit}; "
                "--force powers it off at once"
            )
            if _on_terminal():
                with err.status(waiting):
                    vm = client.vms.stop(name, force=force, timeout=timeout)
            else:
                err.print(waiting, markup=False)
                vm = client.vms.stop(name, force=force, timeout=timeout)
    _emit(vm, as_json, lambda: out.print(f"{vm.name} is {vm.state}"))


@vm_app.command("show")
def vm_show(name: str, as_json: JsonOpt = False) -> None:
    """Show a VM and where each disk's data lives (external, copying N%, local)."""
    with _errors(as_json):
        client = Client()
        vm = client.vms.get(name)
        job = _active_jobs(client).get(vm.id) if not as_json else None
    _emit(vm, as_json, lambda: _render_vm(vm, job))


@vm_app.command("list")
def vm_list(as_json: JsonOpt = False) -> None:
    """List VMs, with where each disk's data is (external, copying N%, local)."""
    with _errors(as_json):
        client = Client()
        vms = client.vms.list()
        jobs = _active_jobs(client) if not as_json and vms else {}

    def render() -> None:
        rows = []
        for vm in vms:
            job = jobs.get(vm.id)
            disks = ", ".join(f"{d.target}:{_where(d, job)}" for d in vm.disks)
            rows.append((vm.name, vm.state, vm.host, f"{vm.memory_mib} MiB", vm.cpus, disks))
        _table(("NAME", "STATE", "HOST", "MEMORY", "CPUS", "DISKS"), rows, keep=("NAME",))

    _emit(vms, as_json, render)


@vm_app.command("remove")
def vm_remove(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Power off a running VM first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a VM and every volume thinair created for it."""
    with _errors(as_json):
        Client().vms.remove(name, force=force)
    _emit({"removed": name}, as_json, lambda: out.print(f"removed {name}"))


def _rollback_question(client: Client, name: str) -> str:
    """What a rollback deletes, as the web UI's confirmation lists it."""
    vm = client.vms.get(name)
    job = _active_jobs(client).get(vm.id)
    lines = [
        f"Roll back {vm.name}: "
        + ("stop it, " if vm.state == VmState.RUNNING else "")
        + (f"cancel its {job.kind}, " if job else "")
        + "undefine its domain and delete:"
    ]
    for d in vm.disks:
        what = (
            "temporary disk: the guest's writes since it was created"
            if d.location == "external"
            else "blank disk made with the VM: all the guest wrote to it"
            if d.blank
            else "imported: the VM's only copy of its data"
        )
        lines.append(f"  {d.target}: {d.volume_path} on {d.storage_domain} ({what})")
    external = [d.external_disk.url for d in vm.disks if d.external_disk]
    if external:
        lines.append("Kept, never written: " + ", ".join(external))
    return "\n".join(lines) + "\nRoll back and delete?"


@vm_app.command("rollback")
def vm_rollback(name: str, yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Delete the VM: stop it, cancel its import, undefine its domain and delete its
    temporary disks (the guest's writes) and the blank disks made with it. Its
    external disks were never written and stay as they are. Not `qm rollback`
    (back to a snapshot, VM kept): this undoes `vm create`. Refused once a disk
    was imported (use `vm remove`). Asks first on a terminal, unless --yes."""
    with _errors(as_json):
        client = Client()
        if not yes and not as_json and sys.stdin.isatty():
            question = _rollback_question(client, name)
            _confirm(question, yes, as_json)
        client.vms.rollback(name)
    _emit(
        {"rolled_back": name},
        as_json,
        lambda: out.print(f"rolled back {name}: VM, domain and temporary disks are gone"),
    )


@vm_app.command("console")
def vm_console(
    name: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    attach: Annotated[
        bool,
        typer.Option(
            "--attach",
            help="Type into the console, as `virsh console` (which it runs, against "
            "the VM's host); leave with Ctrl+].",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the guest's serial console so far (--follow keeps following, --attach
    makes it interactive)."""
    with _errors(as_json):
        client = Client()
        if attach:
            _attach_console(client, name)
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


def _attach_console(client: Client, name: str) -> None:
    """Become `virsh console` on the VM's domain, on the libvirt of its host: the
    engine's API carries the console's output only, libvirt's console stream
    carries both ways (and works across qemu+ssh:// as virsh does)."""
    import shutil

    vm = client.vms.get(name)
    if vm.state != VmState.RUNNING:
        raise InvalidInput(f"{vm.name} is {vm.state}: start it first (`thinair vm start {name}`)")
    uri = client.hosts.get(vm.host).libvirt_uri
    virsh = shutil.which("virsh")
    if virsh is None:
        raise InvalidInput(
            "--attach runs virsh (apt install libvirt-clients) on this machine; without "
            f"it, `thinair vm console {name} --follow` shows the output"
        )
    err.print(
        f"attached to the serial console of {vm.name} (libvirt {uri}); "
        "leave with Ctrl+] (the guest keeps running)",
        markup=False,
    )
    sys.stdout.flush()
    os.execv(virsh, [virsh, "-c", uri, "console", "--force", vm.id])


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
        help="bulk: copy the source's data at full speed into the final volume, then "
        "merge the guest's writes into it (the default for an external disk); mirror: "
        "QEMU copies the whole disk, then switches (what moving a local disk does; over "
        "HTTP it reads through QEMU's curl driver, which QEMU 7.2 can leave stalled); "
        "stream: the same as bulk (QEMU's block pull is not durable).",
    ),
]
VerifyOpt = Annotated[
    str,
    typer.Option(
        "--verify",
        metavar="digest|full",
        help="digest: check each copy read back against digests of what was read from "
        "the source; full: also compare it with the source, read a second time.",
    ),
]
BandwidthOpt = Annotated[
    float | None,
    typer.Option(
        "--bandwidth", metavar="MiB/s", help="Copy at most this many MiB/s [default: no limit]."
    ),
]


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
    if as_json:

        def show(j: Any) -> None:
            print(j.model_dump_json(), flush=True)

        final = client.jobs.wait(job.id, progress=show)
    elif not _on_terminal():
        said: list[str] = []

        def say(j: Any) -> None:  # a line for each change, none repeated
            line = _progress_line(j)
            if not said or said[-1] != line:
                said.append(line)
                print(line, flush=True)

        final = client.jobs.wait(job.id, progress=say)
    else:
        final = _progress_bar(client, job.id)
    if final.state != "succeeded":
        err.print(
            f"[red]error:[/red] job {final.id} {final.state}"
            + (f": {final.error}" if final.error else ""),
            highlight=False,
        )
        raise typer.Exit(1)
    if not as_json:
        took = _duration(
            ((final.finished_at or final.updated_at) - final.created_at).total_seconds()
        )
        out.print(f"job {final.id} succeeded in {took}")


def _progress_line(j: Any) -> str:
    """One line of a job's progress, for a pipe or a log."""
    p = j.progress
    line = f"job {j.id} {j.kind} {j.state}"
    if j.step:
        line += f" {j.step}"
    if p.get("total"):
        line += (
            f" {100 * p.get('done', 0) / p['total']:.0f}% "
            f"({_mib(p.get('done', 0))} of {_mib(p['total'])}) at {_rate(j)}"
        )
    return line


def _progress_bar(client: Client, job_id: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out) as bar:
        tasks: dict[str, Any] = {}

        def show(j: Any) -> None:
            disks = j.progress.get("disks", {})
            # The engine's rate of bytes copied (not of the sparse ones skipped),
            # once for the whole job: on the total's bar, or the one disk's.
            rate = _rate(j)
            for target, d in disks.items():
                if target not in tasks:
                    tasks[target] = bar.add_task(target, total=d["total"], rate="")
                bar.update(
                    tasks[target],
                    completed=d["done"],
                    total=d["total"],
                    description=f"{target} {j.step or j.state}",
                    rate=rate if len(disks) == 1 else "",
                )
            if len(disks) > 1:
                if "total" not in tasks:
                    tasks["total"] = bar.add_task("total", total=j.progress.get("total"), rate="")
                bar.update(
                    tasks["total"],
                    completed=j.progress.get("done", 0),
                    total=j.progress.get("total"),
                    rate=rate,
                )

        return client.jobs.wait(job_id, progress=show)


@vm_app.command("import")
def vm_import(
    name: str,
    to: Annotated[str, typer.Option("--to", metavar="SD", help="Target storage domain.")],
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    verify: VerifyOpt = "digest",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Make every external disk of a VM local, while it runs (or stopped)."""
    with _errors(as_json):
        client = Client()
        job = client.vms.import_(
            name, to=to, strategy=strategy, bandwidth_mib=bandwidth, verify=verify
        )
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
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a VM from a backup: the backup is only read, the guest's writes go to
    a throw-away overlay. Then `backup restore NAME --to SD` keeps it, or
    `vm rollback NAME` discards it."""
    with _errors(as_json):
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
    verify: VerifyOpt = "digest",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep a previewed backup: copy its disks, with the guest's writes, to local
    storage while it runs (an import)."""
    vm_import(name, to, strategy, bandwidth, verify, no_wait, as_json)


@disk_app.command("move")
def disk_move(
    vm: str,
    disk: Annotated[str, typer.Argument(help="Target (vda) or disk id.")],
    to: Annotated[str, typer.Option("--to", metavar="SD", help="Target storage domain.")],
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    verify: VerifyOpt = "digest",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Move one disk of a VM to a storage domain while it runs (oVirt's "move"):
    an external disk is imported, a local one copied there."""
    with _errors(as_json):
        client = Client()
        found = client.disks.find(vm, disk)
        job = client.disks.move(
            found.id, to=to, strategy=strategy, bandwidth_mib=bandwidth, verify=verify
        )
        _follow(client, job, as_json, no_wait)


@app.command("quick-import")
def quick_import(
    to: Annotated[str, typer.Option("--to", help="Storage domain for the disks.")],
    urls: Annotated[list[str] | None, typer.Argument(help="External disks, as for --disk.")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The VM's name (from the OVF with --ova).")
    ] = None,
    ova: OvaOpt = None,
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
    convert: ConvertOpt = False,
    strategy: StrategyOpt = None,
    bandwidth: BandwidthOpt = None,
    verify: VerifyOpt = "digest",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM on external disks (or an OVA), convert it if asked, start it,
    and import it, in one go."""
    with _errors(as_json):
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
        job = client.vms.import_(
            vm.id, to=to, strategy=strategy, bandwidth_mib=bandwidth, verify=verify
        )
        _follow(client, job, as_json, no_wait)


def _took(j: Any) -> float:
    end = j.finished_at or (datetime.now(UTC) if j.state in JOB_ACTIVE else j.updated_at)
    return float((end - j.created_at).total_seconds())


def _render_jobs(client: Client, jobs: list[Any]) -> None:
    """The task log: what ran on which VM, to where, when and for how long."""
    vms = {vm.id: vm.name for vm in client.vms.list()}
    domains = {sd.id: sd.name for sd in client.storage_domains.list()}
    rows = []
    for j in jobs:
        done, total = j.progress.get("done"), j.progress.get("total")
        pct = f"{100 * done / total:.0f}%" if done is not None and total else "-"
        to = j.params.get("to")
        rows.append(
            (
                j.id,
                j.kind,
                vms.get(j.vm_id or "", j.vm_id and j.vm_id[:8]),
                domains.get(to, to) if to else "-",
                j.state,
                j.step,
                pct,
                _when(j.created_at),
                _duration(_took(j)),
                j.error,
            )
        )
    headers = ("ID", "KIND", "VM", "TO", "STATE", "STEP", "DONE", "STARTED", "TOOK", "ERROR")
    _table(headers, rows, keep=("ID", "STARTED"))


def _list_jobs(vm: str | None, as_json: bool) -> None:
    with _errors(as_json):
        client = Client()
        jobs = client.jobs.list(vm=vm)
        _emit(jobs, as_json, lambda: _render_jobs(client, jobs))


VmFilterOpt = Annotated[
    str | None, typer.Option("--vm", metavar="VM", help="Only this VM's jobs (name or id).")
]


@jobs_app.callback()
def jobs_callback(ctx: typer.Context, vm: VmFilterOpt = None, as_json: JsonOpt = False) -> None:
    """List jobs, newest first (as `jobs list`)."""
    if ctx.invoked_subcommand is None:
        _list_jobs(vm, as_json)


@jobs_app.command("list")
def jobs_list(vm: VmFilterOpt = None, as_json: JsonOpt = False) -> None:
    """List jobs, newest first: kind, VM, target storage domain, state, start, duration."""
    _list_jobs(vm, as_json)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix of it.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one job: its steps with their times, its progress and its error in full."""
    with _errors(as_json):
        client = Client()
        job = client.jobs.get(job_id)
        if as_json:
            _emit(job, as_json, lambda: None)
            return
        _render_jobs(client, [job])
        steps = [e for e in job.log if e.what is not None]
        rows = []
        for i, e in enumerate(steps):
            end = steps[i + 1].at if i + 1 < len(steps) else None
            took = _duration((end - e.at).total_seconds()) if end else "-"
            rows.append((_when(e.at), took, _mib(e.done) if e.done is not None else "-", e.what))
        if rows:
            out.print()
            _table(("AT", "TOOK", "DONE", "STEP"), rows, keep=("AT",))
        if job.progress.get("total"):
            out.print(_progress_line(job), markup=False)
        if job.error:
            out.print(f"error: {job.error}", markup=False)


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix of it.")],
    as_json: JsonOpt = False,
) -> None:
    """Follow a job until it ends."""
    with _errors(as_json):
        client = Client()
        _follow(client, client.jobs.get(job_id), as_json, no_wait=False)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id or a unique prefix of it.")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job: the VM goes on running on its temporary disks."""
    with _errors(as_json):
        job = Client().jobs.cancel(job_id)
    _emit(job, as_json, lambda: out.print(f"cancelling job {job.id}"))


# -- hosts ---------------------------------------------------------------------


@host_app.command("list")
def host_list(as_json: JsonOpt = False) -> None:
    """List the libvirt hosts the engine drives."""
    with _errors(as_json):
        hosts = Client().hosts.list()

    def render() -> None:
        rows = []
        for h in hosts:
            if not h.reachable:
                rows.append((h.name, h.libvirt_uri, f"unreachable: {h.error}", *"----", h.vms))
                continue
            rows.append(
                (
                    h.name,
                    h.libvirt_uri,
                    f"{h.hypervisor} {h.hypervisor_version}",
                    h.cpus,
                    f"{h.memory_mib} MiB",
                    f"{h.free_memory_mib} MiB",
                    h.domain_type,
                    h.vms,
                )
            )
        headers = ("NAME", "URI", "HYPERVISOR", "CPUS", "MEMORY", "FREE", "DOMAINS", "VMS")
        _table(headers, rows, keep=("NAME", "URI"))

    _emit(hosts, as_json, render)


def _render_host(h: Any) -> None:
    out.print(f"{h.name}  {h.libvirt_uri}  id {h.id}", markup=False)
    if not h.reachable:
        out.print(f"unreachable: {h.error}", markup=False)
    else:
        out.print(
            f"{h.hypervisor} {h.hypervisor_version}, {h.cpus} CPU, {h.memory_mib} MiB "
            f"({h.free_memory_mib} MiB free), domains {h.domain_type}, {h.vms} VM(s)",
            markup=False,
        )


@host_app.command("add")
def host_add(name: str, uri: str, as_json: JsonOpt = False) -> None:
    """Register a libvirt host: qemu+ssh://, qemu+tls://, qemu+tcp:// or qemu:///system."""
    with _errors(as_json):
        host = Client().hosts.add(name, uri)
    _emit(host, as_json, lambda: _render_host(host))


@host_app.command("show")
def host_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one host: its hypervisor, memory and VMs."""
    with _errors(as_json):
        host = Client().hosts.get(name)
    _emit(host, as_json, lambda: _render_host(host))


@host_app.command("remove")
def host_remove(name: str, as_json: JsonOpt = False) -> None:
    """Forget a host that has no VMs and no storage domain of its own."""
    with _errors(as_json):
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
    with _errors(as_json):
        token = Client().tokens.create(name, read_only=read_only)
    _emit(token, as_json, lambda: print(token.token))


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """List API tokens (never their secrets)."""
    with _errors(as_json):
        tokens = Client().tokens.list()

    def render() -> None:
        rows = [
            (
                t.name,
                "read-only" if t.read_only else "read-write",
                _when(t.created_at),
                _when(t.revoked_at),
            )
            for t in tokens
        ]
        _table(("NAME", "ACCESS", "CREATED", "REVOKED"), rows, keep=("NAME", "CREATED"))

    _emit(tokens, as_json, render)


@token_app.command("revoke")
def token_revoke(name: str, as_json: JsonOpt = False) -> None:
    """Revoke an API token: it stops working at once."""
    with _errors(as_json):
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
        rows = []
        for e in entries:
            outcome = e.outcome if e.outcome == "ok" else f"{e.outcome} ({e.status})"
            if e.message:
                outcome += f": {e.message[:80]}"
            when = e.at.strftime("%Y-%m-%d %H:%M:%S")
            rows.append((when, e.token, e.client, e.action, e.target, outcome))
        headers = ("TIME", "TOKEN", "CLIENT", "ACTION", "TARGET", "OUTCOME")
        _table(headers, rows, keep=("TIME", "TARGET"))

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
    with _errors(as_json):
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
    with _errors(as_json):
        exports = Client().exports.list()

    def render() -> None:
        rows = []
        for e in exports:
            state = f"{e.state}: {e.error}" if e.error and e.state != "running" else e.state
            rows.append((e.id, e.name, state, e.tls, e.clients, _size(e.bytes_read), e.url))
        headers = ("ID", "NAME", "STATE", "TLS", "CLIENTS", "READ", "URL")
        _table(headers, rows, keep=("ID", "NAME", "URL"))
        for e in exports:
            if e.warning:
                err.print(f"[yellow]warning:[/yellow] {e.name}: {e.warning}", highlight=False)

    _emit(exports, as_json, render)


@app.command()
def unexpose(
    export: Annotated[str, typer.Argument(help="Export name, id or a unique prefix of its id.")],
    as_json: JsonOpt = False,
) -> None:
    """Stop an export: its server, keys and files are gone (a VM's disk is merged
    back into its volume)."""
    with _errors(as_json):
        Client().exports.remove(export)
    _emit({"removed": export}, as_json, lambda: out.print(f"stopped export {export}"))


class _Command(TyperCommand):
    """Options and arguments named as man pages name them (--memory MEMORY, NAME),
    not by their Python type (<int>, <list[str]>), unless given a metavar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
                param.metavar = param.name.upper()
            if isinstance(param, TyperArgument):  # "NAME", not "NAME <str>"
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]


for _group in (app, storage_app, vm_app, disk_app, jobs_app, token_app, host_app, backup_app):
    for _info in _group.registered_commands:
        if _info.cls in (None, TyperCommand):
            _info.cls = _Command


def main() -> None:
    app()


if __name__ == "__main__":
    main()
