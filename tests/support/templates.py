"""Migrated template databases: each test's fresh database starts as a copy of one.

Migrating a new database costs a tenth to a fifth of a second, and a thousand tests each
make one. Instead, one database per backend is migrated once per test session and every
test gets a copy: a file copy on SQLite, ``CREATE DATABASE … TEMPLATE`` on PostgreSQL. The
copy is at the head revision, so a server's own ``migrate()`` at start finds nothing to do.
Tests of the migrations themselves ask for an empty database instead.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

from tests.support import postgres as pg
from tether_server.clock import SystemClock
from tether_server.store.database import Database

_lock = threading.Lock()
_sqlite_template: Path | None = None
_pg_templates: dict[str, str] = {}


def _migrate(url: str) -> None:
    async def run() -> None:
        db = Database(url, SystemClock())
        try:
            await db.migrate()
        finally:
            await db.dispose()

    pg.run_isolated(run)


def sqlite_copy(directory: Path, target: Path) -> None:
    """Copy the migrated SQLite template (made in ``directory`` on first use) to ``target``."""
    global _sqlite_template
    with _lock:
        if _sqlite_template is None:
            template = directory / "template.db"
            _migrate(f"sqlite:///{template}")
            # Fold the WAL into the main file so one file is the whole database.
            with sqlite3.connect(template) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            _sqlite_template = template
    shutil.copyfile(_sqlite_template, target)


def pg_copy(admin_url: str) -> str:
    """A new database copied from the migrated PostgreSQL template; its URL."""
    with _lock:
        template = _pg_templates.get(admin_url)
        if template is None:
            template = pg.create_database(admin_url)
            _migrate(template)
            _pg_templates[admin_url] = template
    return pg.create_database(admin_url, template=template)


def drop_templates() -> None:
    for admin_url, template in _pg_templates.items():
        pg.drop_database(admin_url, template)
    _pg_templates.clear()
