"""The engine's database: SQLAlchemy models, sessions, Alembic migrations."""
