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
