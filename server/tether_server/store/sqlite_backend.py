"""SQLite: one writer thread runs whole batches; reader threads run snapshots.

The writer connection begins every batch with ``BEGIN IMMEDIATE`` (so two processes on one
file never both read and then both write), runs each unit inside its own savepoint by
driving the unit's coroutine synchronously in the thread (the ``Tx`` never suspends), and
commits once: with ``synchronous=FULL`` that is one fsync per batch, and a committed
fencing token survives power loss. WAL lets readers run beside the writer.

One server process per file: ``lock()`` (called by ``Database.migrate``, the first thing a
server does) takes an exclusive ``flock`` on ``<file>.lock`` until ``close()``, so a second
``tether serve`` on the same file refuses to start (``DatabaseInUse``) instead of
detaching the first one's KeepAlive streams at its start-up. The kernel drops the lock when
the process dies, so a crash never leaves the file locked. Databases of one process share
the lock (tests run several servers on one file in one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from tether_server.clock import Clock
from tether_server.domain.errors import StoreUnavailable, TetherError
from tether_server.futures import discard_outcome
from tether_server.store.batch import RACE_SQLITE_MESSAGES, BatchResult, Pending, Retry, Unit
from tether_server.store.sql import Sql, sql
from tether_server.store.tx import Row, Tx

log = logging.getLogger(__name__)
T = TypeVar("T")

_INSERT_EVENT = sql(
    "INSERT INTO events (revision, area, namespace, key, object_id, type, occurred_at_us,"
    " snapshot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
_SET_REVISION = sql("UPDATE revisions SET current = $1 WHERE id = 1")
_READERS = 2
# How long a read waits for a reader connection before answering UNAVAILABLE.
DEFAULT_POOL_TIMEOUT_S = 10.0


class DatabaseInUse(RuntimeError):
    """Another process holds the SQLite file's lock (it serves the file)."""


# Lock files this process holds: path -> (descriptor, how many backends use it).
_held_locks: dict[str, tuple[int, int]] = {}
_held_guard = threading.Lock()


def _lock_file(path: str) -> str:
    lock_path = os.path.realpath(path) + ".lock"
    with _held_guard:
        held = _held_locks.get(lock_path)
        if held is not None:
            _held_locks[lock_path] = (held[0], held[1] + 1)
            return lock_path
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"the SQLite database {path} is in use by another tether process (pid "
                f"{holder}, lock file {lock_path}): run one server per SQLite file, or use "
                "PostgreSQL for several replicas"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # For the message a second process shows; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[lock_path] = (fd, 1)
        return lock_path


def _unlock_file(lock_path: str) -> None:
    with _held_guard:
        fd, users = _held_locks.pop(lock_path)
        if users > 1:
            _held_locks[lock_path] = (fd, users - 1)
            return
        # Not deleted: removing a lock file races with another process opening it.
        os.close(fd)


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

    def __init__(
        self, path: str, clock: Clock, pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S
    ) -> None:
        self._path = path
        self._clock = clock
        # Reads beyond the reader threads wait for one this long, then answer UNAVAILABLE.
        self.pool_timeout_s = pool_timeout_s
        self.pool_size = _READERS
        self._reader_slots = asyncio.Semaphore(_READERS)
        self._lock_path: str | None = None
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
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                await self._reader_slots.acquire()
        except TimeoutError:
            raise StoreUnavailable(
                f"no store connection free within {self.pool_timeout_s:g}s; retry with backoff"
            ) from None
        try:
            work = loop.run_in_executor(self._readers, self._read, unit, snapshot)
        except BaseException:
            self._reader_slots.release()
            raise
        # Freed when the thread is done, not when a cancelled caller stops waiting.
        work.add_done_callback(lambda _: self._reader_slots.release())
        return await _unavailable_on_error(work)

    def lock(self) -> None:
        """Take the file's process lock (idempotent); ``close()`` releases it. Raises
        DatabaseInUse when another process holds it."""
        if self._lock_path is None and self._path not in ("", ":memory:"):
            self._lock_path = _lock_file(self._path)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._close_connections()
        finally:
            if self._lock_path is not None:
                lock_path, self._lock_path = self._lock_path, None
                _unlock_file(lock_path)

    async def _close_connections(self) -> None:
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
                    result = _race_or_fault(exc)
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


def _race_or_fault(exc: Exception) -> Any:
    """A unit's failure: Retry for a known race (see batch.KNOWN_RACES), else the error
    itself for its caller (a constraint violation of no known race is a server bug)."""
    if isinstance(exc, sqlite3.IntegrityError):
        if str(exc) in RACE_SQLITE_MESSAGES:
            return Retry()
        log.error("constraint violation that is no known race: %s", exc)
    return exc


async def _unavailable_on_error(work: asyncio.Future[T]) -> T:
    """The one place SQLite's errors are interpreted. A cancelled caller never cancels the
    thread's work: it finishes (and commits or rolls back) on its own."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        # Nobody awaits the work any more: collect its outcome so an error it ends with
        # (the caller hung up) is not logged as "never retrieved".
        work.add_done_callback(discard_outcome)
        raise
    # A constraint violation outside a unit is a bug, not an outage.
    except (TetherError, RuntimeError, sqlite3.IntegrityError):
        raise
    except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
        raise StoreUnavailable(f"the store is unavailable; retry with backoff ({exc})") from exc
