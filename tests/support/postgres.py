"""Throwaway databases for tests: one fresh, empty (un-migrated) database per test.

PostgreSQL tests need ``TETHER_TEST_POSTGRES_URL``, the admin URL of a server on which the
tests may create and drop databases (e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``).
Without it they are skipped locally and fail under CI (``CI=true``), so a CI run can never
pass while silently skipping PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ENV_VAR = "TETHER_TEST_POSTGRES_URL"
EXAMPLE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_PREFIX = "tether_t_"

T = TypeVar("T")


def configured_admin_url() -> str | None:
    """The admin URL from the environment, or None when PostgreSQL tests are not set up."""
    return os.environ.get(ENV_VAR) or None


def pg_admin_url() -> str:
    """The admin URL; skips the calling test (fails it under CI) when it is not configured."""
    url = configured_admin_url()
    if url is not None:
        return url
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"{ENV_VAR} is not set under CI: PostgreSQL tests must run in CI, not be skipped. "
            f"Set it to an admin URL, e.g. {EXAMPLE_URL}",
            pytrace=False,
        )
    pytest.skip(f"PostgreSQL tests need {ENV_VAR}, e.g. {EXAMPLE_URL}")


def database_url(admin_url: str, dbname: str) -> str:
    """``admin_url`` with its database replaced by ``dbname`` (same user, host, port)."""
    parts = urlsplit(admin_url)
    scheme = "postgresql" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, f"/{dbname}", parts.query, ""))


def _asyncpg_dsn(url: str) -> str:
    """asyncpg accepts only postgres:// and postgresql://, not SQLAlchemy's +driver forms."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, ""))


def run_isolated(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a private event loop in its own thread.

    Safe from sync fixtures, from async tests (a loop is already running on this thread)
    and without disturbing the event loop pytest-asyncio manages.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="tether-test-pg", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _execute(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_database(admin_url: str, template: str | None = None) -> str:
    """Create a new database ``tether_t_<hex>`` (empty, or a copy of the ``template``
    database's URL); return its URL."""
    dbname = DB_PREFIX + secrets.token_hex(8)
    statement = f"CREATE DATABASE {_quote_ident(dbname)}"
    if template is not None:
        statement += f" TEMPLATE {_quote_ident(urlsplit(template).path.lstrip('/'))}"
    run_isolated(lambda: _execute(admin_url, statement))
    return database_url(admin_url, dbname)


def drop_database(admin_url: str, url_or_name: str) -> None:
    """Drop a database made by :func:`create_database`, disconnecting whoever still uses it."""
    dbname = urlsplit(url_or_name).path.lstrip("/") if "://" in url_or_name else url_or_name
    if not dbname.startswith(DB_PREFIX):
        raise ValueError(f"refusing to drop {dbname!r}: not a test database ({DB_PREFIX}*)")
    run_isolated(
        lambda: _execute(admin_url, f"DROP DATABASE IF EXISTS {_quote_ident(dbname)} WITH (FORCE)")
    )


@contextmanager
def fresh_postgres_database(admin_url: str | None = None) -> Iterator[str]:
    """A fresh empty PostgreSQL database for the duration of the block."""
    admin = admin_url or pg_admin_url()
    url = create_database(admin)
    try:
        yield url
    finally:
        drop_database(admin, url)
