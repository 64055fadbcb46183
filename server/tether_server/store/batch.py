"""What the committer hands a backend, and what it gets back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tether_server.store.tx import Event, Tx

T = TypeVar("T")
Unit = Callable[[Tx], Awaitable[T]]


class Retry(Exception):
    """A transient conflict (a unique insert raced another replica's, a deadlock, a
    serialization failure): the unit runs again in a later batch."""


@dataclass(frozen=True)
class Race:
    """A unique key two writers can both find free and then both insert."""

    table: str
    columns: tuple[str, ...]
    # PostgreSQL's name for it (asyncpg reports it as ``constraint_name``).
    constraint: str

    @property
    def sqlite_message(self) -> str:
        """SQLite names a violated unique key only by its columns, in this message."""
        return "UNIQUE constraint failed: " + ", ".join(f"{self.table}.{c}" for c in self.columns)


# The only constraint violations retried as races: each is a unit that looks for a row and
# inserts it when absent, and on PostgreSQL (READ COMMITTED) two replicas can both look
# before either commits; the loser runs again and finds the winner's row. (On SQLite every
# batch holds the write lock from its first statement, so these never fire there.) Any
# other violation is a bug: retrying it would turn it into an endless client retry, so it
# is reported as a server fault (INTERNAL) instead.
KNOWN_RACES = (
    # Acquire's request-id record (leases/acquire.py: _remember, _GRANT_PG, _CLAIM_KEY_PG).
    Race("lease_requests", ("namespace", "request_id"), "lease_requests_pkey"),
    # CreateSaga of one id (sagas/units.py: create).
    Race("sagas", ("namespace", "saga_id"), "sagas_pkey"),
    # CreateObject of one name (objects/units.py: create).
    Race("objects", ("namespace", "kind", "name"), "uq_objects_name"),
)
RACE_CONSTRAINTS = frozenset(race.constraint for race in KNOWN_RACES)
RACE_SQLITE_MESSAGES = frozenset(race.sqlite_message for race in KNOWN_RACES)


@dataclass
class Pending:
    unit: Unit[Any]
    # Whether the unit may append events: such batches lock the revision counter first.
    emits: bool
    attempts: int = 0


@dataclass
class BatchResult:
    # One per unit, in order: the unit's result, or the exception it raised (Retry for a
    # transient conflict).
    outcomes: list[Any]
    events: list[Event] = field(default_factory=list)
    deadlines: list[int] = field(default_factory=list)
    last_revision: int | None = None


def is_failure(outcome: Any) -> bool:
    return isinstance(outcome, BaseException)
