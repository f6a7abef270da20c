"""Alembic migrations of the records (run by :mod:`cerebro.store.schema`, never imported)."""
