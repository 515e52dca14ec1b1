"""Each flow's job parameters, one typed model per flow.

The job's row keeps them as JSON (Job.params); the runner validates them with
the flow's model when it runs the job and when the flow updates them, and an
update merges the keys it gives into the stored ones. A cancel request is not
a parameter: it is the job's own column (Job.cancel_requested).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# How a disk is copied; stream is a job submitted before it was retired.
Strategy = Literal["bulk", "mirror", "stream"]


class JobParams(BaseModel):
    """What every flow's parameters are: no key the flow does not know."""

    model_config = ConfigDict(extra="forbid")


class ImportParams(JobParams):
    """`vm import` and `disk move` (engine/imports.py)."""

    to: str = Field(description="the target storage domain's id")
    bandwidth: int | None = Field(default=None, description="bytes/s, or no limit")
    strategies: dict[str, Strategy] = Field(description="how each disk is copied")
    verify: Literal["digest", "full"] = "digest"
    disks: list[str] = Field(description="the ids of the disks to copy, in order")
    # Each disk's volume before the switch (deleted once the disk is local).
    old: dict[str, str] = Field(default_factory=dict)


class ConvertParams(JobParams):
    """virt-v2v over a new VM's temporary disks (engine/convert.py)."""

    began: bool = Field(default=False, description="virt-v2v has run over the overlays")
    log: str | None = Field(default=None, description="virt-v2v's log")
