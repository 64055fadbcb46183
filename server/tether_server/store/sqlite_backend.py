"""SQLite: one writer thread runs whole batches; reader threads run snapshots.

The writer connection begins every batch with ``BEGIN IMMEDIATE`` (so two processes on one
file never both read and then both write), runs each unit inside its own savepoint by
driving the unit's coroutine synchronously in the thread (the ``Tx`` never suspends), and
commits once: with ``synchronous=FULL`` that is one fsync per batch, and a committed
fencing token survives power loss. WAL lets readers run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from tether_server.clock import Clock
from tether_server.domain.errors import StoreUnavailable, TetherError
from tether_server.store.batch import BatchResult, Pending, Retry, Unit
from tether_server.store.sql import Sql, sql
from tether_server.store.tx import Row, Tx

T = TypeVar("T")

_INSERT_EVENT = sql(
    "INSERT INTO events (revision, area, namespace, key, object_id, type, occurred_at_us,"
    " snapshot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
_SET_REVISION = sql("UPDATE revisions SET current = $1 WHERE id = 1")
_READERS = 2


def drive(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to completion, here and now."""
    coro = cast(Coroutine[Any, Any, T], awaitable)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a unit of work awaited something other than its Tx on SQLite")


def _args(args: Sequence[Any]) -> list[Any]:
    # Lists go to json_each() (see sql.py).
    return [json.dumps(a) if isinstance(a, list | tuple) else a for a in args]


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection, clock: Clock) -> None:
        super().__init__(clock)
        self._conn = conn

    async def fetch(self, stmt: Sql, *args: Any) -> list[Row]:
        if stmt.writes:
            self._note_write()
        return self._conn.execute(stmt.sqlite, _args(args)).fetchall()

    async def execute(self, stmt: Sql, *args: Any) -> int:
        if stmt.writes:
            self._note_write()
        return self._conn.execute(stmt.sqlite, _args(args)).rowcount

    async def executemany(self, stmt: Sql, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._note_write()
            self._conn.executemany(stmt.sqlite, [_args(r) for r in rows])

    async def flush(self) -> None:
        if self.events:
            await self.executemany(
                _INSERT_EVENT,
                [
                    (
                        e.revision,
                        e.area,
                        e.namespace,
                        e.key,
                        e.object_id,
                        e.type,
                        e.occurred_at_us,
                        e.snapshot,
                    )
                    for e in self.events
                ],
            )
        if self.revision_changed:
            await self.execute(_SET_REVISION, self.last_revision)


def _connect(path: str, *, writer: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    _enable_wal(conn)
    # FULL: the commit of a batch is durable (one fsync per batch, paid for by batching).
    conn.execute("PRAGMA synchronous=FULL" if writer else "PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switching a new file to WAL needs an exclusive lock, and SQLite answers "locked" at
    once when two processes open the same new file together: retry briefly (first open
    of a file only)."""
    for attempt in range(100):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.02)


class SqliteBackend:
    is_pg = False

    def __init__(self, path: str, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tether-sqlite-writer")
        self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="tether-sqlite-reader")
        self._writer_conn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    async def run_batch(self, batch: Sequence[Pending]) -> BatchResult:
        loop = asyncio.get_running_loop()
        return await _unavailable_on_error(loop.run_in_executor(self._writer, self._batch, batch))

    async def read(self, unit: Unit[T], *, snapshot: bool = True) -> T:
        loop = asyncio.get_running_loop()
        return await _unavailable_on_error(
            loop.run_in_executor(self._readers, self._read, unit, snapshot)
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._close_writer)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    # ---- in the writer thread -------------------------------------------------------

    def _batch(self, batch: Sequence[Pending]) -> BatchResult:
        if self._writer_conn is None:
            self._writer_conn = _connect(self._path, writer=True)
        conn = self._writer_conn
        tx = SqliteTx(conn, self._clock)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if any(p.emits for p in batch):
                drive(tx.lock_revisions())
            outcomes: list[Any] = []
            for pending in batch:
                tx.begin_unit()
                conn.execute("SAVEPOINT unit")
                try:
                    result: Any = drive(pending.unit(tx))
                except Exception as exc:
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                    tx.drop_unit()
                    if isinstance(exc, sqlite3.OperationalError):
                        raise
                    # Another process inserted the same unique row first.
                    result = Retry() if isinstance(exc, sqlite3.IntegrityError) else exc
                else:
                    conn.execute("RELEASE unit")
                outcomes.append(result)
            drive(tx.flush())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return BatchResult(outcomes, tx.events, tx.deadlines, tx.last_revision)

    def _close_writer(self) -> None:
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    # ---- in a reader thread ---------------------------------------------------------

    def _read(self, unit: Unit[T], snapshot: bool) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self._path, writer=False)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        tx = SqliteTx(conn, self._clock)
        if not snapshot:
            return drive(unit(tx))
        conn.execute("BEGIN")
        try:
            return drive(unit(tx))
        finally:
            conn.execute("COMMIT")


async def _unavailable_on_error(work: asyncio.Future[T]) -> T:
    """The one place SQLite's errors are interpreted. A cancelled caller never cancels the
    thread's work: it finishes (and commits or rolls back) on its own."""
    try:
        return await asyncio.shield(work)
    except (TetherError, RuntimeError):
        raise
    except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
        raise StoreUnavailable(f"the store is unavailable; retry with backoff ({exc})") from exc
