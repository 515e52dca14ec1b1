"""The engine's REST API under /api/v1 (FastAPI), with bearer-token auth."""
