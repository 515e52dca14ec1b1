"""The engine, built whole in one place: its context, the job runner in it, and
the flows that runner runs. Whatever runs the engine (the API service, a test)
builds it here, so no one wires a runner or its flows by hand."""

from __future__ import annotations

from thinair.config import Settings
from thinair.engine import convert, imports
from thinair.engine.context import EngineContext


def build(settings: Settings, poll_interval: float = 5.0) -> EngineContext:
    """A context whose job runner knows every flow (nothing runs until started)."""
    ctx = EngineContext(settings, poll_interval)
    imports.register(ctx.jobs)
    convert.register(ctx.jobs)
    return ctx
