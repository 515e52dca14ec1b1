"""Alembic environment: runs on the connection Database.upgrade() hands over."""

from alembic import context
from sqlalchemy import create_engine

from thinair.db.models import Base

config = context.config
connection = config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:  # `alembic revision --autogenerate` from a developer's shell
    engine = create_engine(
        str(config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url"))
    )
    with engine.begin() as conn:
        _run(conn)
