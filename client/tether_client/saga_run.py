"""Sagas from Python: run one under a lease, step by step, and compensate it when it fails.

::

    async with client.run_saga("open-pr", "task-168", {"repo": "tether"}) as saga:
        branch = await saga.step("branch", make_branch, compensate=delete_branch,
                                 compensation_payload=lambda name: {"branch": name})
        pr = await saga.step("pull-request", open_pr)
        saga.set_output({"pr": pr})

``run_saga`` creates the saga (when it is new), holds a lease for it with ``hold()``,
claims it with that lease's fence, and on exit completes it, or fails it and runs the
compensations. Each ``step`` is recorded before its action runs (with the compensation
it registers) and after; on a later attempt a step that already succeeded is not run
again: its recorded output is returned. docs/sagas.md is the contract with the server.

When the claim is lost (the lease lost, which cancels the body, or the server refusing
the fence: ``STALE_FENCING_TOKEN``, ``LEASE_EXPIRED``, ``INVALID_SAGA_STATE`` …), the
error propagates and nothing more is recorded: the saga belongs to someone else now.

``CompensationWorker`` claims sagas of a kind that need compensating (failed with
``compensate="hand_off"``, or stale while compensating) and runs their compensations
with handlers looked up by compensation name.

Values that travel (input, outputs, payloads) are JSON: ``None``, ``bool``, numbers,
``str``, lists and ``str``-keyed dicts. Numbers come back as ``int`` when they are whole.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, TypeAlias, TypedDict, TypeVar, Unpack, overload

from tether_client.clock import sleep_or_wake
from tether_client.convert import Seconds, seconds
from tether_client.errors import (
    InvalidSagaState,
    LeaseEnded,
    LeaseNotFound,
    LeaseNotHeld,
    NothingClaimable,
    NotLeaseHolder,
    SagaAlreadyEnded,
    SagaClaimed,
    SagaNotFound,
    SagaTerminal,
    StaleFencingToken,
    StepConflict,
    TetherError,
    Unavailable,
    WaitTimeout,
)
from tether_client.keeper import HeldLease, Keeper
from tether_client.pb import common_pb2, saga_pb2
from tether_client.results import Claim
from tether_client.sagas import SagasClient
from tether_client.threads import call_user_code
from tether_client.transport import Transport
from tether_client.values import from_struct, from_value, to_struct, to_value

log = logging.getLogger("tether_client.saga")

T = TypeVar("T")
# A compensation handler: called with the payload its step registered; may be async.
Handler = Callable[[Any], object]
OnStale = Literal["requeue", "compensate", "quarantine"]
CompensateMode = Literal["inline", "hand_off"]
SagaState: TypeAlias = saga_pb2.SagaState.ValueType

# The claim is gone: its lease, or the saga's acceptance of its fence. Nothing more may be
# recorded for it; whoever claims the saga next carries on from the log.
FENCED_OUT: tuple[type[TetherError], ...] = (
    LeaseNotHeld,
    LeaseEnded,
    LeaseNotFound,
    NotLeaseHolder,
    StaleFencingToken,
    InvalidSagaState,
    SagaTerminal,
)

# A compensation worker's claim that went elsewhere: on to the next saga.
_MOVED_ON: tuple[type[TetherError], ...] = (*FENCED_OUT, SagaClaimed)

_PENDING = (saga_pb2.COMPENSATION_STATUS_PENDING, saga_pb2.COMPENSATION_STATUS_FAILED)
_DONE = (saga_pb2.COMPENSATION_STATUS_SUCCEEDED, saga_pb2.COMPENSATION_STATUS_MANUAL)
# The server takes at most 1024 bytes of a reason; leave room for its own words.
_MAX_TEXT_BYTES = 1000


# --- helpers -------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return _truncate(repr(exc))


def _truncate(text: str, max_bytes: int = _MAX_TEXT_BYTES) -> str:
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "..."


def _compensation_name(step: str, compensate: Handler | str | None) -> str:
    """A step's compensation name: the handler's name when given as a string, else
    ``undo-<step>`` (stable across attempts whatever the callable is called)."""
    return compensate if isinstance(compensate, str) else f"undo-{step}"


def _add_note(exc: BaseException, note: str) -> None:
    log.warning("%s", note)
    exc.add_note(note)


def _state_name(state: SagaState) -> str:
    return saga_pb2.SagaState.Name(state).removeprefix("SAGA_STATE_")


# --- options ------------------------------------------------------------------------------


class SagaOptions(TypedDict, total=False):
    """The options of :func:`run_saga` (``client.run_saga(kind, saga_id, input, **options)``)."""

    ttl: Seconds
    holder: str | None
    namespace: str | None
    labels: Mapping[str, str] | None
    on_stale: OnStale | None
    max_attempts: int | None
    deadline: datetime | None
    wait: Seconds
    compensate: CompensateMode
    retryable: bool
    retry_after: Seconds
    handlers: Mapping[str, Handler] | None


class CompensationOptions(TypedDict, total=False):
    """The options of :class:`CompensationWorker`."""

    ttl: Seconds
    holder: str | None
    namespace: str | None
    wait: Seconds
    poll_interval: Seconds
    stop: asyncio.Event | None


# --- running compensations -----------------------------------------------------------------


class _Compensator:
    """Runs a COMPENSATING saga's pending compensations under a claim, last step first."""

    def __init__(
        self,
        transport: Transport,
        sagas: SagasClient,
        saga: saga_pb2.Saga,
        fence: Callable[[], common_pb2.Fence],
        handler: Callable[[saga_pb2.CompensationRecord], Handler | None],
    ) -> None:
        self._transport = transport
        self._sagas = sagas
        self._saga = saga
        self._fence = fence
        self._handler = handler

    async def run(self) -> SagaState:
        """Run every pending compensation; the saga's state afterwards."""
        state = self._saga.state
        pending = [c for c in self._saga.compensations if c.status in _PENDING]
        for record in sorted(pending, key=lambda c: -c.step_index):
            state = await self._run_one(record)
            if state != saga_pb2.SAGA_STATE_COMPENSATING:
                break
        return state

    async def _run_one(self, record: saga_pb2.CompensationRecord) -> SagaState:
        handler = self._handler(record)
        attempts = record.attempts
        while True:
            error = await self._attempt(record, handler)
            response = await self._sagas.record_compensation(
                self._saga.saga_id,
                self._fence(),
                record.step_index,
                (
                    saga_pb2.COMPENSATION_STATUS_FAILED
                    if error
                    else saga_pb2.COMPENSATION_STATUS_SUCCEEDED
                ),
                error=error,
                # Naming the attempt makes a repeated report harmless (and retryable).
                attempt=attempts + 1,
                namespace=self._saga.namespace,
            )
            done = response.compensation.status in _DONE
            if done or response.state != saga_pb2.SAGA_STATE_COMPENSATING:
                return response.state
            attempts = response.compensation.attempts
            log.warning(
                "compensation %r of saga %r step %d failed (attempt %d of %d): %s",
                record.name,
                self._saga.saga_id,
                record.step_index,
                attempts,
                response.compensation.max_attempts,
                error,
            )
            await self._transport.clock.sleep(self._transport.retry.delay(attempts))

    async def _attempt(self, record: saga_pb2.CompensationRecord, handler: Handler | None) -> str:
        """Run the handler once; the error text, empty on success."""
        if handler is None:
            return f"no handler for compensation {record.name!r}"
        try:
            await call_user_code(handler, from_value(record.payload))
        except Exception as exc:
            return _describe(exc)
        return ""


# --- one run of a saga ---------------------------------------------------------------------


class SagaRun:
    """A claimed saga, inside ``async with client.run_saga(...) as saga``.

    ``replay`` is True when the saga had already COMPLETED: the block runs again, every
    ``step`` returns its recorded output and nothing is executed or recorded.
    """

    def __init__(
        self,
        transport: Transport,
        sagas: SagasClient,
        saga: saga_pb2.Saga,
        fence: common_pb2.Fence | None,
        lease: HeldLease | None,
        handlers: Mapping[str, Handler],
    ) -> None:
        self._transport = transport
        self._sagas = sagas
        self._lease = lease
        self._handlers = handlers
        self._claim_fence = fence
        #: The saga as last answered by the server (with its logs after claim and failure).
        self.saga = saga
        #: The step log as claimed: what earlier attempts recorded.
        self.steps: tuple[saga_pb2.SagaStep, ...] = tuple(saga.steps)
        #: The progress the last heartbeat stored (an earlier attempt's, at first).
        self.progress: bytes = saga.progress
        self._log = {step.index: step for step in saga.steps}
        # Compensation names registered so far, by step index.
        self._registered = {
            step.index: step.compensation.name
            for step in saga.steps
            if step.HasField("compensation") and step.compensation.name
        }
        # Compensations of steps run by this process: index -> (name, handler).
        self._local: dict[int, tuple[str, Handler]] = {}
        self._next_index = 0
        self._in_step = False
        self._output: dict[str, Any] | None = None
        self._fenced_out: TetherError | None = None

    # --- what the body reads ----------------------------------------------------------------

    @property
    def saga_id(self) -> str:
        return self.saga.saga_id

    @property
    def kind(self) -> str:
        return self.saga.kind

    @property
    def namespace(self) -> str:
        return self.saga.namespace

    @property
    def attempt(self) -> int:
        """This claim's attempt (1 for the first run)."""
        return self.saga.attempt

    @property
    def input(self) -> dict[str, Any]:
        return from_struct(self.saga.input)

    @property
    def state(self) -> SagaState:
        return self.saga.state

    @property
    def replay(self) -> bool:
        """Whether this is a re-run of a saga that had already completed (nothing runs)."""
        return self._lease is None

    @property
    def lease(self) -> HeldLease:
        """The lease under which the saga is claimed (``LeaseNotHeld`` in a replay)."""
        if self._lease is None:
            raise LeaseNotHeld(f"saga {self.saga_id!r} had completed: a replay holds no lease")
        return self._lease

    @property
    def fence(self) -> common_pb2.Fence:
        """The claim's fence; raises ``LeaseLost`` once the lease is lost."""
        if self._lease is None or self._claim_fence is None:
            raise SagaAlreadyEnded.of(self.saga)
        try:
            self._lease.check()
        except LeaseNotHeld as exc:
            self._fenced_out = exc
            raise
        return self._claim_fence

    @property
    def fenced_out(self) -> TetherError | None:
        """Why the claim is gone, once a call found out (nothing more is recorded then)."""
        return self._fenced_out

    def set_output(self, output: Mapping[str, Any]) -> None:
        """The saga's output, recorded when the block completes it."""
        to_struct(output)  # refuse what is not JSON now, not at the end
        self._output = dict(output)

    # --- steps ------------------------------------------------------------------------------

    @overload
    async def step(
        self,
        name: str,
        action: Callable[[], Awaitable[T]],
        *,
        compensate: Handler | str | None = None,
        compensation_payload: object = None,
        max_attempts: int | None = None,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        action: Callable[[], T],
        *,
        compensate: Handler | str | None = None,
        compensation_payload: object = None,
        max_attempts: int | None = None,
    ) -> T: ...

    async def step(
        self,
        name: str,
        action: Callable[[], Any],
        *,
        compensate: Handler | str | None = None,
        compensation_payload: object = None,
        max_attempts: int | None = None,
    ) -> Any:
        """Run the next step, or return its recorded output if it succeeded before.

        ``action`` (sync or async, no arguments) returns a JSON value. ``compensate`` undoes
        it when the saga fails: a callable run by this process, registered as
        ``undo-<name>``, or the name of a handler (``handlers`` of run_saga, or a
        compensation worker's). It is registered before the action runs, with
        ``compensation_payload``: a JSON value, or a callable of the action's output
        (registered again once the step succeeded). ``max_attempts`` bounds the
        compensation's attempts before the saga is quarantined (the server's default: 3).
        """
        if self._in_step:
            raise RuntimeError("the steps of a saga run one at a time")
        index = self._next_index
        recorded = self._log.get(index)
        if recorded is not None and recorded.name != name:
            raise StepConflict(
                f"step {index} of saga {self.saga_id!r} is {recorded.name!r} in the log, "
                f"not {name!r}: the saga's code no longer matches its earlier runs",
                metadata={"step_index": str(index), "step": recorded.name},
            )
        self._next_index += 1
        comp_name = _compensation_name(name, compensate)
        if callable(compensate):
            self._local[index] = (comp_name, compensate)
        if recorded is not None and recorded.status == saga_pb2.STEP_STATUS_SUCCEEDED:
            return from_value(recorded.output)
        if self.replay:
            raise StepConflict(
                f"saga {self.saga_id!r} completed without a step {index} ({name!r}): the "
                "saga's code no longer matches the run that completed it",
                metadata={"step_index": str(index), "step": name},
            )
        compensation = None
        if compensate is not None or compensation_payload is not None:
            compensation = saga_pb2.Compensation(name=comp_name, max_attempts=max_attempts or 0)
            self._registered[index] = comp_name
        self._in_step = True
        try:
            return await self._run_step(index, name, action, compensation, compensation_payload)
        finally:
            self._in_step = False

    async def _run_step(
        self,
        index: int,
        name: str,
        action: Callable[[], Any],
        compensation: saga_pb2.Compensation | None,
        payload: object,
    ) -> Any:
        payload_of_output = payload if callable(payload) else None
        if compensation is not None and payload_of_output is None:
            compensation.payload.CopyFrom(to_value(payload))
        # Registered before the side effect: a crash halfway still gets compensated.
        await self._record(index, name, saga_pb2.STEP_STATUS_STARTED, compensation=compensation)
        try:
            output = await call_user_code(action)
            value = to_value(output)  # refuses what is not JSON before anything is recorded
            if compensation is not None and payload_of_output is not None:
                compensation.payload.CopyFrom(to_value(payload_of_output(output)))
            else:
                compensation = None  # registered with STARTED already
        except Exception as exc:
            await self._record_failure(index, name, exc)
            raise
        await self._record(
            index, name, saga_pb2.STEP_STATUS_SUCCEEDED, output=value, compensation=compensation
        )
        return output

    async def _record_failure(self, index: int, name: str, exc: Exception) -> None:
        try:
            await self._record(index, name, saga_pb2.STEP_STATUS_FAILED, error=_describe(exc))
        except TetherError as error:
            if self._fenced_out is not None:
                raise  # the claim is gone: that is what the caller must see now
            _add_note(exc, f"recording the failure of step {index} ({name}) failed: {error}")

    async def _record(
        self,
        index: int,
        name: str,
        status: saga_pb2.StepStatus.ValueType,
        *,
        output: object = None,
        error: str = "",
        compensation: saga_pb2.Compensation | None = None,
    ) -> None:
        response = await self._fenced(
            self._sagas.record_step(
                self.saga_id,
                self.fence,
                index,
                name,
                status,
                output=output,
                error=error,
                compensation=compensation,
                namespace=self.namespace,
            )
        )
        self._log[index] = response.step
        self.saga.state = response.state

    async def heartbeat(self, progress: bytes) -> None:
        """Store progress details (read by the next attempt) and renew the claim's lease."""
        if self.replay:
            return
        response = await self._fenced(
            self._sagas.heartbeat(
                self.saga_id, self.fence, progress=progress, namespace=self.namespace
            )
        )
        self.progress = progress
        self.saga.state = response.state

    async def _fenced(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except FENCED_OUT as exc:
            self._fenced_out = exc
            raise

    # --- the end ----------------------------------------------------------------------------

    async def _complete(self) -> None:
        if self.replay:
            return
        self.saga = await self._fenced(
            self._sagas.complete(
                self.saga_id, self.fence, output=self._output, namespace=self.namespace
            )
        )

    async def _fail(
        self, exc: Exception, *, hand_off: bool, retryable: bool, retry_after: Seconds
    ) -> None:
        """Record the body's failure and, unless handed off, run the compensations.

        Problems doing so are logged and noted on ``exc``: the caller sees its own error.
        """
        if self._lease is None or self._fenced_out is not None or self._lease.lost:
            return
        if not hand_off and not self._can_compensate():
            log.warning(
                "saga %r: a registered compensation has no handler in this process; "
                "handing its compensation off",
                self.saga_id,
            )
            hand_off = True
        try:
            self.saga = await self._fenced(
                self._sagas.fail(
                    self.saga_id,
                    self.fence,
                    reason=_describe(exc),
                    retryable=retryable,
                    retry_after=retry_after,
                    hand_off=hand_off,
                    namespace=self.namespace,
                )
            )
            if not hand_off and self.saga.state == saga_pb2.SAGA_STATE_COMPENSATING:
                compensator = _Compensator(
                    self._transport, self._sagas, self.saga, lambda: self.fence, self._handler
                )
                self.saga.state = await self._fenced(compensator.run())
        except TetherError as error:
            _add_note(exc, f"saga {self.saga_id!r}: recording the failure failed: {error}")

    def _handler(self, record: saga_pb2.CompensationRecord) -> Handler | None:
        local = self._local.get(record.step_index)
        if local is not None and local[0] == record.name:
            return local[1]
        return self._handlers.get(record.name)

    def _can_compensate(self) -> bool:
        """Whether this process has a handler for every compensation registered so far."""
        return all(
            self._handler(saga_pb2.CompensationRecord(step_index=index, name=name)) is not None
            for index, name in self._registered.items()
        )


# --- run_saga ------------------------------------------------------------------------------

_ENDED = (
    saga_pb2.SAGA_STATE_COMPLETED,
    saga_pb2.SAGA_STATE_COMPENSATED,
    saga_pb2.SAGA_STATE_FAILED,
    saga_pb2.SAGA_STATE_QUARANTINED,
    saga_pb2.SAGA_STATE_CANCELLED,
)


async def _ensure_saga(
    sagas: SagasClient,
    saga_id: str,
    kind: str,
    input: Mapping[str, Any] | None,
    namespace: str,
    options: SagaOptions,
) -> saga_pb2.Saga:
    """The saga, created unless it exists; without an input an existing saga is taken as is."""
    if input is None:
        try:
            found = await sagas.get(saga_id, namespace=namespace)
        except SagaNotFound:
            pass
        else:
            if found.kind != kind:
                raise ValueError(f"saga {saga_id!r} is of kind {found.kind!r}, not {kind!r}")
            return found
    # Same id and body: a repeat returns the first saga, so racing creators agree.
    created = await sagas.create(
        saga_id,
        kind,
        input=input or {},
        labels=options.get("labels"),
        on_stale=options.get("on_stale"),
        max_attempts=options.get("max_attempts") or 0,
        deadline=options.get("deadline"),
        namespace=namespace,
    )
    return created.saga


@asynccontextmanager
async def run_saga(
    transport: Transport,
    sagas: SagasClient,
    keeper: Keeper,
    kind: str,
    saga_id: str | None = None,
    input: Mapping[str, Any] | None = None,
    **options: Unpack[SagaOptions],
) -> AsyncIterator[SagaRun]:
    """Claim a saga and run the block as its next attempt (``client.run_saga``).

    With ``saga_id`` the saga is created first when it does not exist (``input``,
    ``labels``, ``on_stale``, ``max_attempts``, ``deadline``; with an ``input`` a repeat
    must match the first body), its key ``sagas/<saga_id>`` is held (``ttl``, default 30 s;
    cancelling the block if the lease is lost), waiting up to ``wait`` for it, and the saga
    is claimed under that lease. Without it, the oldest claimable saga of ``kind`` is
    claimed (long-polling up to ``wait``; ``NothingClaimable`` when there is none).

    The block runs ``await saga.step(...)``. When it ends normally the saga is completed
    (with ``saga.set_output``); when it raises, the saga is failed with the error's repr
    (``retryable``: back to claimable after ``retry_after`` while attempts are left) and,
    with ``compensate="inline"`` (the default), the compensations run here, last step
    first, with each step's ``compensate`` or ``handlers[name]``; ``"hand_off"`` leaves them
    to a compensation worker (as does a missing handler). The block's error is re-raised
    either way. A lost lease cancels the block (``LeaseLost``); a refused fence propagates;
    then nothing more is recorded.

    A saga that has already ended: COMPLETED runs the block as a replay (every step returns
    its recorded output, nothing is executed or recorded: an idempotent re-run); any other
    end raises :class:`~tether_client.errors.SagaAlreadyEnded` naming the state.
    """
    compensate = options.get("compensate", "inline")
    if compensate not in ("inline", "hand_off"):
        raise ValueError(f"compensate is 'inline' or 'hand_off', not {compensate!r}")
    namespace = transport.ns(options.get("namespace"))
    holder = options.get("holder") or transport.holder
    ttl = seconds(options.get("ttl", 30))
    wait = seconds(options.get("wait", 0))
    handlers = options.get("handlers") or {}
    if saga_id is not None:
        saga = await _ensure_saga(sagas, saga_id, kind, input, namespace, options)
        if saga.state in _ENDED:
            yield _ended(transport, sagas, saga, handlers)
            return
        key = f"sagas/{saga_id}"
        key_wait = wait
    else:
        if input is not None:
            raise ValueError("an input needs a saga_id: a saga is created only by its id")
        # The worker's own lease: the claim fences this one saga with it.
        key = f"sagas/workers/{holder}/{uuid.uuid4().hex}"
        key_wait = 0
    async with keeper.hold(
        key, ttl=ttl, holder=holder, namespace=namespace, wait=key_wait, cancel_on_lost=True
    ) as lease:
        try:
            claim = await sagas.claim(
                saga_id,
                kind="" if saga_id is not None else kind,
                fence=lease.fence,
                wait=wait,
                namespace=namespace,
            )
        except (SagaTerminal, InvalidSagaState):
            if saga_id is None:
                raise
            # It ended between our read and the claim (another worker finished it).
            saga = await sagas.get(saga_id, namespace=namespace)
            if saga.state not in _ENDED:
                raise
            claim = None
        if claim is None:
            run = _ended(transport, sagas, saga, handlers)
        else:
            run = SagaRun(transport, sagas, claim.saga, claim.fence, lease, handlers)
        try:
            yield run
        except Exception as exc:
            await run._fail(
                exc,
                hand_off=compensate == "hand_off",
                retryable=options.get("retryable", False),
                retry_after=options.get("retry_after", 0),
            )
            raise
        # Anything else (a lost lease's cancellation, Ctrl-C) records nothing: once the
        # lease is released or runs out the saga is stale, and its on-stale policy decides.
        await run._complete()


def _ended(
    transport: Transport, sagas: SagasClient, saga: saga_pb2.Saga, handlers: Mapping[str, Handler]
) -> SagaRun:
    """A replay of a COMPLETED saga; ``SagaAlreadyEnded`` for any other end."""
    if saga.state != saga_pb2.SAGA_STATE_COMPLETED:
        raise SagaAlreadyEnded.of(saga)
    return SagaRun(transport, sagas, saga, None, None, handlers)


# --- the compensation worker ---------------------------------------------------------------


class CompensationWorker:
    """Claims sagas of ``kind`` that are COMPENSATING and runs their compensations.

    ``run_once()`` handles at most one saga; ``run()`` loops until ``stop`` is set (a saga
    being compensated is finished first). Handlers are looked up by compensation name and
    called with the payload (sync ones in a thread of their own); a compensation without a
    handler counts as failed (so the saga ends QUARANTINED for an operator rather than
    being claimed over and over).
    """

    def __init__(
        self,
        transport: Transport,
        sagas: SagasClient,
        keeper: Keeper,
        kind: str,
        handlers: Mapping[str, Handler],
        **options: Unpack[CompensationOptions],
    ) -> None:
        self._transport = transport
        self._sagas = sagas
        self._keeper = keeper
        self.kind = kind
        self.handlers = handlers
        self.ttl = seconds(options.get("ttl", 30))
        self.holder = options.get("holder") or transport.holder
        self.namespace = transport.ns(options.get("namespace"))
        self.wait = seconds(options.get("wait", 0))
        self.poll_interval = seconds(options.get("poll_interval", 1.0))
        self.stop = options.get("stop") or asyncio.Event()
        #: Sagas whose compensation this worker finished (any end state), in order.
        self.handled: list[tuple[str, SagaState]] = []

    async def run_once(self) -> SagaState | None:
        """Claim one saga (waiting up to ``wait``) and compensate it: its state afterwards,
        or None when nothing was claimable (or ``stop`` was set while waiting)."""
        key = f"sagas/workers/{self.holder}/{uuid.uuid4().hex}"
        async with self._keeper.hold(
            key, ttl=self.ttl, holder=self.holder, namespace=self.namespace, cancel_on_lost=True
        ) as lease:
            claimed = await self._claim(lease)
            if claimed is None:
                return None

            def fence() -> common_pb2.Fence:
                lease.check()
                return claimed.fence

            compensator = _Compensator(
                self._transport,
                self._sagas,
                claimed.saga,
                fence,
                lambda record: self.handlers.get(record.name),
            )
            state = await compensator.run()
            self.handled.append((claimed.saga.saga_id, state))
            log.info("saga %r compensated: %s", claimed.saga.saga_id, _state_name(state))
            return state

    async def _claim(self, lease: HeldLease) -> Claim | None:
        claiming = asyncio.ensure_future(
            self._sagas.claim(
                kind=self.kind,
                purpose=saga_pb2.CLAIM_PURPOSE_COMPENSATE,
                fence=lease.fence,
                wait=self.wait,
                namespace=self.namespace,
            )
        )
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({claiming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not claiming.done():
                claiming.cancel()
        if not claiming.done():
            # Stopped while waiting. A claim that lands anyway is compensated like any.
            await asyncio.wait({claiming})
        if claiming.cancelled():
            return None
        try:
            return claiming.result()
        except (NothingClaimable, WaitTimeout):
            return None

    async def run(self) -> None:
        """Compensate sagas of the kind until ``stop`` is set."""
        failures = 0
        while not self.stop.is_set():
            try:
                state = await self.run_once()
            except _MOVED_ON as exc:
                # This saga went to someone else (or its claim ended): on to the next.
                log.warning("compensation worker for %r: %s", self.kind, exc)
                continue
            except Unavailable as exc:
                failures += 1
                log.warning("compensation worker for %r: %s", self.kind, exc)
                await sleep_or_wake(
                    self._transport.clock, self._transport.retry.delay(failures), self.stop
                )
                continue
            failures = 0
            if state is None:
                await sleep_or_wake(self._transport.clock, self.poll_interval, self.stop)


__all__ = [
    "FENCED_OUT",
    "CompensateMode",
    "CompensationOptions",
    "CompensationWorker",
    "Handler",
    "OnStale",
    "SagaOptions",
    "SagaRun",
    "run_saga",
]
