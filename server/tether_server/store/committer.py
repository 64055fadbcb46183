"""Group commit: writes that arrive while a transaction is in flight share the next one.

There is no timer: an idle server commits a lone write at once, and under load batches
grow by themselves to whatever arrived during the previous commit (etcd's batched backend,
River's batch completer). Each unit runs in its own savepoint, so one refusal never undoes
the others, and the batch pays one BEGIN, one COMMIT and one fsync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tether_server.domain.errors import StoreUnavailable
from tether_server.futures import discard_outcome
from tether_server.store.batch import BatchResult, Pending, Retry, Unit

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_ATTEMPTS = 5


class Backend(Protocol):
    async def run_batch(self, batch: Sequence[Pending]) -> BatchResult: ...


@dataclass(frozen=True)
class CommitterConfig:
    # Units per transaction at most. Bigger batches share one commit (and fsync) among more
    # writes; the cap bounds the latency of a batch and the memory of its results.
    max_batch: int = 1024


@dataclass
class _Waiting:
    pending: Pending
    future: asyncio.Future[Any]


class Committer:
    def __init__(
        self,
        backend: Backend,
        config: CommitterConfig | None = None,
        on_commit: Callable[[BatchResult], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._backend = backend
        self._config = config or CommitterConfig()
        self._on_commit = on_commit
        self._on_batch = on_batch
        self._queue: list[_Waiting] = []
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, unit: Unit[T], *, emits: bool = True) -> T:
        """Run ``unit`` in the next batch; its result, or the exception it raised."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Retrieved even when the caller was cancelled, so asyncio never logs it as lost.
        future.add_done_callback(discard_outcome)
        self._queue.append(_Waiting(Pending(unit, emits), future))
        self._kick.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tether-committer")
        # A cancelled caller does not cancel the batch: the unit may still commit.
        result: T = await asyncio.shield(future)
        return result

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        task = self._task
        if task is not None:
            self._kick.set()
            await task

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._queue:
                size = self._config.max_batch
                batch, self._queue = self._queue[:size], self._queue[size:]
                # Not cancellable half-way: a batch in flight always finishes.
                await asyncio.shield(self._commit(batch))
            if self._closed:
                return

    async def _commit(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        pendings, slots = _merge(batch)
        try:
            result = await self._backend.run_batch(pendings)
        except Exception as exc:
            failure = exc if isinstance(exc, StoreUnavailable) else _unexpected(exc)
            for waiting in batch:
                _settle(waiting.future, failure)
            return
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        if self._on_commit is not None:
            try:
                self._on_commit(result)
            except Exception:
                log.exception("after-commit hook failed")
        again: list[_Waiting] = []
        for waiting, (index, position) in zip(batch, slots, strict=True):
            outcome = result.outcomes[index]
            if position is not None and not isinstance(outcome, BaseException):
                outcome = outcome[position]
            if isinstance(outcome, Retry):
                waiting.pending.attempts += 1
                if waiting.pending.attempts < _MAX_ATTEMPTS:
                    again.append(waiting)
                    continue
                outcome = StoreUnavailable("the store kept reporting conflicts; retry")
            _settle(waiting.future, outcome)
        if again:
            self._queue[:0] = again
            self._kick.set()


def _merge(batch: Sequence[_Waiting]) -> tuple[list[Pending], list[tuple[int, int | None]]]:
    """Units that can merge (they have a ``merge`` staticmethod: ``merge(units)`` is one unit
    returning a list with each one's result) run as one, in the place of the first of them.
    Returns the pendings to run and, per waiting unit, (its pending, its position in a
    merged result or None)."""
    pendings: list[Pending] = []
    slots: list[tuple[int, int | None]] = []
    groups: dict[Any, tuple[int, list[Any]]] = {}
    for waiting in batch:
        unit = waiting.pending.unit
        merge = getattr(unit, "merge", None)
        if merge is None:
            slots.append((len(pendings), None))
            pendings.append(waiting.pending)
            continue
        if merge not in groups:
            groups[merge] = (len(pendings), [])
            pendings.append(waiting.pending)  # replaced by the merged unit below
        index, members = groups[merge]
        slots.append((index, len(members)))
        members.append(unit)
    for merge, (index, members) in groups.items():
        pendings[index] = Pending(merge(members), pendings[index].emits)
    return pendings, slots


def _unexpected(exc: Exception) -> Exception:
    log.error("store batch failed", exc_info=exc)
    return exc


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
