"""A builder whose module takes CEREBRO_TEST_IMPORT_DELAY seconds to import, so that a test can
catch a worker while it starts (workers import the module when they receive ``build``)."""

from __future__ import annotations

import os
import time

from builders import mlp

time.sleep(float(os.environ.get("CEREBRO_TEST_IMPORT_DELAY", "0")))


def build(params: dict) -> object:
    return mlp(params)
