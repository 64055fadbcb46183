"""Fixtures shared by every test.

- ``db_url``: runs a test once per backend (ids ``sqlite`` and ``postgres``) with the URL
  of a fresh database of its own, already at the current schema (a copy of a template
  migrated once per session: see tests/support/templates.py).
- ``empty_db_url``: the same, but empty (un-migrated): for tests of the migrations.
- ``db_factory``: more fresh databases inside one test (``db_factory("postgres")``;
  ``empty=True`` for an un-migrated one).
- ``pg_admin_url``: the PostgreSQL admin URL (skips locally / fails under CI when unset).
- ``fake_clock``: a ``FakeClock`` for in-process tests.
- ``file_clock`` and ``server_factory``: drive real server processes.
- ``test_pki``: a CA, server and client certificates for TLS tests (tests/support/certs.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import postgres as pg
from tests.support import templates
from tests.support.server_process import FileClockDriver, ServerProcess

if TYPE_CHECKING:
    from tests.support.certs import TestPki
    from tether_server.clock import FakeClock

BACKENDS = ("sqlite", "postgres")

DbFactory = Callable[..., str]
ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def pg_admin_url() -> str:
    return pg.pg_admin_url()


@pytest.fixture
def db_factory(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbFactory]:
    """``db_factory(backend)`` returns the URL of another fresh, empty database.

    PostgreSQL databases are dropped (``WITH (FORCE)``) when the test ends.
    """
    created: list[tuple[str, str]] = []
    sqlite_count = 0

    def make(backend: str = "sqlite", *, empty: bool = False) -> str:
        nonlocal sqlite_count
        if backend == "sqlite":
            sqlite_count += 1
            path = tmp_path / ("tether.db" if sqlite_count == 1 else f"tether-{sqlite_count}.db")
            if not empty:
                templates.sqlite_copy(tmp_path_factory.getbasetemp(), path)
            return f"sqlite:///{path}"
        if backend == "postgres":
            admin = pg.pg_admin_url()
            url = pg.create_database(admin) if empty else templates.pg_copy(admin)
            created.append((admin, url))
            return url
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")

    yield make

    errors: list[BaseException] = []
    for admin, url in reversed(created):
        try:
            pg.drop_database(admin, url)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, db_factory: DbFactory) -> str:
    """URL of a fresh database at the current schema, once per backend."""
    backend: str = request.param
    return db_factory(backend)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def empty_db_url(request: pytest.FixtureRequest, db_factory: DbFactory) -> str:
    """URL of a fresh, empty (un-migrated) database, once per backend."""
    backend: str = request.param
    return db_factory(backend, empty=True)


@pytest.fixture(scope="session", autouse=True)
def _drop_template_databases() -> Iterator[None]:
    yield
    templates.drop_templates()


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """Certificates shared by the session's tests (read-only: make your own to change them)."""
    from tests.support.certs import make_test_pki  # only the tests that use it need it

    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def fake_clock() -> FakeClock:
    # Imported here so a broken server package fails only the tests that use it.
    from tether_server.clock import FakeClock

    return FakeClock()


@pytest.fixture
def file_clock(tmp_path: Path) -> FileClockDriver:
    """A clock file for server processes: pass ``env=file_clock.env`` to the server."""
    return FileClockDriver(tmp_path / "clock")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``server_factory(db_url, **ServerProcess kwargs)`` starts a server, stopped at teardown.

    Logs go to ``tmp_path/logs``. Servers still running at the end get SIGTERM (then SIGKILL).
    """
    servers: list[ServerProcess] = []

    def start(db_url: str, **kwargs: Any) -> ServerProcess:
        kwargs.setdefault("log_dir", tmp_path / "logs")
        server = ServerProcess(db_url, **kwargs)
        servers.append(server)
        return server.start()

    yield start

    errors: list[BaseException] = []
    for server in reversed(servers):
        try:
            server.terminate()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
