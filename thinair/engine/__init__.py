"""The flows (run, stop, remove, rollback, ...) as persisted, idempotent steps,
and the reconciler that finishes or undoes them after a crash."""
