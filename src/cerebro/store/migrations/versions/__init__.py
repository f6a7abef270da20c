"""One file per schema version of the records, oldest first (see :mod:`cerebro.store.schema`)."""
