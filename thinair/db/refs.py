"""Finding a row by what a user types: its name, its id, or a unique prefix of
its id (as git and docker take a short commit or container id).

One place for every kind of record, so `thinair jobs watch 2ccbeb2d` works as
`thinair vm show 2ccbeb2d` does, and an ambiguous prefix says which rows it
could mean.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair.errors import InvalidInput, NotFound

Row = TypeVar("Row")

# Shorter than this, a prefix is too likely to be a typo of a name.
MIN_PREFIX = 4
# How many existing ones a "not found" names.
LISTED = 10


def _label(row: Any) -> str:
    name = getattr(row, "name", None)
    return f"{name} ({row.id[:8]})" if name else str(row.id)


def find(s: Session, model: type[Row], ref: str, what: str, list_existing: bool = False) -> Row:
    """The row whose name or id is `ref`, else the one row whose id starts with
    it. NotFound (naming the existing ones when `list_existing`) or InvalidInput
    for a prefix several ids share."""
    table: Any = model
    has_name = hasattr(model, "name")
    exact = table.id == ref
    if has_name:
        exact = (table.name == ref) | exact
    row = s.scalar(select(model).where(exact))
    if row is not None:
        return row
    if len(ref) >= MIN_PREFIX:
        prefixed = table.id.startswith(ref, autoescape=True)
        matches = list(s.scalars(select(model).where(prefixed).limit(LISTED)))
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InvalidInput(
                f"{what} id prefix {ref!r} is ambiguous: it matches "
                + ", ".join(_label(m) for m in matches)
            )
    message = f"no {what} {ref!r}"
    if list_existing:
        column = table.name if has_name else table.id
        existing = list(s.scalars(select(column).order_by(column).limit(LISTED + 1)))
        if not existing:
            message += f" (there is no {what} yet)"
        else:
            shown = ", ".join(existing[:LISTED]) + (", ..." if len(existing) > LISTED else "")
            message += f"; there are: {shown}"
    raise NotFound(message)
