"""Start a real, throwaway PostgreSQL server for tests (Debian's packages; .ci/run installs
them). As root, the server runs as the ``postgres`` user, since initdb refuses root."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

REQUIRED = os.environ.get("CEREBRO_REQUIRE_POSTGRES") == "1"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"PostgreSQL is required (CEREBRO_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a fresh database on a server started for the duration."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        _unavailable("initdb/pg_ctl not found")
    run_as: list[str] = []
    base = tempfile.mkdtemp(prefix="cerebro-pg-")
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            _unavailable("running as root without runuser")
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    data, log = os.path.join(base, "data"), os.path.join(base, "server.log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*args: str) -> None:
        subprocess.run([*run_as, *args], check=True, capture_output=True, timeout=120)

    try:
        run(initdb, "-D", data, "-U", "cerebro", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", data, "-o", options, "-l", log, "-w", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"the server did not start: {getattr(e, 'stderr', e)!r}")
    try:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=cerebro dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE cerebro_test")
        yield f"postgresql://cerebro:unused@127.0.0.1:{port}/cerebro_test"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)
