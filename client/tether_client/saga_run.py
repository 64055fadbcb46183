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
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, overload

from google.protobuf import struct_pb2

from tether_client.convert import Seconds, to_duration
from tether_client.errors import (
    InvalidSagaState,
    LeaseEnded,
    LeaseNotFound,
    LeaseNotHeld,
    NothingClaimable,
    NotLeaseHolder,
    SagaClaimed,
    SagaNotFound,
    SagaTerminal,
    StaleFencingToken,
    StepConflict,
    TetherError,
    Unavailable,
    WaitTimeout,
)
from tether_client.keeper import HeldLease
from tether_client.pb import common_pb2, saga_pb2
from tether_client.values import from_struct, from_value, to_struct, to_value

if TYPE_CHECKING:
    from tether_client.client import TetherClient

log = logging.getLogger("tether_client.saga")

T = TypeVar("T")
# A compensation handler: called with the payload its step registered; may be async.
Handler = Callable[[Any], object]
OnStale = Literal["requeue", "compensate", "quarantine"]
CompensateMode = Literal["inline", "hand_off"]
SagaState: TypeAlias = "saga_pb2.SagaState.ValueType"

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

_ON_STALE: dict[str, saga_pb2.OnStalePolicy.ValueType] = {
    "requeue": saga_pb2.ON_STALE_POLICY_REQUEUE,
    "compensate": saga_pb2.ON_STALE_POLICY_COMPENSATE,
    "quarantine": saga_pb2.ON_STALE_POLICY_QUARANTINE,
}
_PENDING = (saga_pb2.COMPENSATION_STATUS_PENDING, saga_pb2.COMPENSATION_STATUS_FAILED)
_DONE = (saga_pb2.COMPENSATION_STATUS_SUCCEEDED, saga_pb2.COMPENSATION_STATUS_MANUAL)
# The server takes at most 1024 bytes of a reason; leave room for its own words.
_MAX_TEXT_BYTES = 1000


# --- helpers -------------------------------------------------------------------------------


async def _call(fn: Callable[..., object], *args: object) -> Any:
    """Call a sync or async callable and return its result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


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


# --- running compensations -----------------------------------------------------------------


class _Compensator:
    """Runs a COMPENSATING saga's pending compensations under a claim, last step first."""

    def __init__(
        self,
        client: TetherClient,
        saga: saga_pb2.Saga,
        fence: Callable[[], common_pb2.Fence],
        handler: Callable[[saga_pb2.CompensationRecord], Handler | None],
    ) -> None:
        self._client = client
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
            response = await self._client.sagas.record_compensation(
                saga_pb2.RecordCompensationRequest(
                    namespace=self._saga.namespace,
                    saga_id=self._saga.saga_id,
                    fence=self._fence(),
                    step_index=record.step_index,
                    status=(
                        saga_pb2.COMPENSATION_STATUS_FAILED
                        if error
                        else saga_pb2.COMPENSATION_STATUS_SUCCEEDED
                    ),
                    error=error,
                    # Naming the attempt makes a repeated report harmless (and retryable).
                    attempt=attempts + 1,
                )
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
            await self._client.clock.sleep(self._client.retry_policy.delay(attempts))

    async def _attempt(self, record: saga_pb2.CompensationRecord, handler: Handler | None) -> str:
        """Run the handler once; the error text, empty on success."""
        if handler is None:
            return f"no handler for compensation {record.name!r}"
        try:
            await _call(handler, from_value(record.payload))
        except Exception as exc:
            return _describe(exc)
        return ""


# --- one run of a saga ---------------------------------------------------------------------


class SagaRun:
    """A claimed saga, inside ``async with client.run_saga(...) as saga``."""

    def __init__(
        self,
        client: TetherClient,
        claim: saga_pb2.ClaimSagaResponse,
        lease: HeldLease,
        handlers: Mapping[str, Handler],
    ) -> None:
        self._client = client
        self._lease = lease
        self._handlers = handlers
        self._claim_fence = claim.fence
        #: The saga as last answered by the server (with its logs after claim and failure).
        self.saga = claim.saga
        #: The step log as claimed: what earlier attempts recorded.
        self.steps: tuple[saga_pb2.SagaStep, ...] = tuple(claim.saga.steps)
        #: The progress the last heartbeat stored (an earlier attempt's, at first).
        self.progress: bytes = claim.saga.progress
        self._log = {step.index: step for step in claim.saga.steps}
        # Compensation names registered so far, by step index.
        self._registered = {
            step.index: step.compensation.name
            for step in claim.saga.steps
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
    def lease(self) -> HeldLease:
        return self._lease

    @property
    def fence(self) -> common_pb2.Fence:
        """The claim's fence; raises ``LeaseLost`` once the lease is lost."""
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
            output = await _call(action)
            value = to_value(output)
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
        output: struct_pb2.Value | None = None,
        error: str = "",
        compensation: saga_pb2.Compensation | None = None,
    ) -> None:
        request = saga_pb2.RecordStepRequest(
            namespace=self.namespace,
            saga_id=self.saga_id,
            fence=self.fence,
            index=index,
            name=name,
            status=status,
            output=output,
            error=error,
            compensation=compensation,
        )
        response = await self._fenced(self._client.sagas.record_step(request))
        self._log[index] = response.step
        self.saga.state = response.state

    async def heartbeat(self, progress: bytes) -> None:
        """Store progress details (read by the next attempt) and renew the claim's lease."""
        request = saga_pb2.HeartbeatSagaRequest(
            namespace=self.namespace, saga_id=self.saga_id, fence=self.fence, progress=progress
        )
        response = await self._fenced(self._client.sagas.heartbeat_saga(request))
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
        request = saga_pb2.CompleteSagaRequest(
            namespace=self.namespace, saga_id=self.saga_id, fence=self.fence
        )
        if self._output is not None:
            request.output.CopyFrom(to_struct(self._output))
        response = await self._fenced(self._client.sagas.complete_saga(request))
        self.saga = response.saga

    async def _fail(
        self, exc: Exception, *, hand_off: bool, retryable: bool, retry_after: Seconds
    ) -> None:
        """Record the body's failure and, unless handed off, run the compensations.

        Problems doing so are logged and noted on ``exc``: the caller sees its own error.
        """
        if self._fenced_out is not None or self._lease.lost:
            return
        if not hand_off and not self._can_compensate():
            log.warning(
                "saga %r: a registered compensation has no handler in this process; "
                "handing its compensation off",
                self.saga_id,
            )
            hand_off = True
        request = saga_pb2.FailSagaRequest(
            namespace=self.namespace,
            saga_id=self.saga_id,
            reason=_describe(exc),
            retryable=retryable,
            retry_after=to_duration(retry_after),
            hand_off=hand_off,
        )
        try:
            request.fence.CopyFrom(self.fence)
            self.saga = (await self._fenced(self._client.sagas.fail_saga(request))).saga
            if not hand_off and self.saga.state == saga_pb2.SAGA_STATE_COMPENSATING:
                compensator = _Compensator(
                    self._client, self.saga, lambda: self.fence, self._handler
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


async def _ensure_saga(
    client: TetherClient,
    request: saga_pb2.CreateSagaRequest,
    *,
    input_given: bool,
) -> None:
    """Create the saga unless it exists; without an input an existing saga is taken as is."""
    if not input_given:
        try:
            found = await client.sagas.get_saga(
                saga_pb2.GetSagaRequest(namespace=request.namespace, saga_id=request.saga_id)
            )
        except SagaNotFound:
            pass
        else:
            if found.saga.kind != request.kind:
                raise ValueError(
                    f"saga {request.saga_id!r} is of kind {found.saga.kind!r}, not {request.kind!r}"
                )
            return
    # Same id and body: a repeat returns the first saga, so racing creators agree.
    await client.sagas.create_saga(request)


@asynccontextmanager
async def run_saga(
    client: TetherClient,
    kind: str,
    saga_id: str | None = None,
    input: Mapping[str, Any] | None = None,
    *,
    ttl: Seconds = 30,
    holder: str | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    on_stale: OnStale | None = None,
    max_attempts: int | None = None,
    deadline: datetime | None = None,
    wait: Seconds = 0,
    compensate: CompensateMode = "inline",
    retryable: bool = False,
    retry_after: Seconds = 0,
    handlers: Mapping[str, Handler] | None = None,
) -> AsyncIterator[SagaRun]:
    """See :meth:`TetherClient.run_saga`."""
    if compensate not in ("inline", "hand_off"):
        raise ValueError(f"compensate is 'inline' or 'hand_off', not {compensate!r}")
    namespace = client.namespace if namespace is None else namespace
    holder = holder or client.holder
    claim = saga_pb2.ClaimSagaRequest(
        namespace=namespace, purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE, wait=to_duration(wait)
    )
    if saga_id is not None:
        create = saga_pb2.CreateSagaRequest(
            namespace=namespace,
            saga_id=saga_id,
            kind=kind,
            labels=dict(labels or {}),
            input=to_struct(input or {}),
            on_stale=_ON_STALE[on_stale] if on_stale else saga_pb2.ON_STALE_POLICY_UNSPECIFIED,
            max_attempts=max_attempts or 0,
        )
        if deadline is not None:
            create.deadline.FromDatetime(deadline)
        await _ensure_saga(client, create, input_given=input is not None)
        claim.saga_id = saga_id
        key = f"sagas/{saga_id}"
        key_wait = wait
    else:
        if input is not None:
            raise ValueError("an input needs a saga_id: a saga is created only by its id")
        claim.kind = kind
        # The worker's own lease: the claim fences this one saga with it.
        key = f"sagas/workers/{holder}/{uuid.uuid4().hex}"
        key_wait = 0
    async with client.hold(
        key, ttl=ttl, holder=holder, namespace=namespace, wait=key_wait, on_lost="cancel"
    ) as lease:
        claim.existing_lease.CopyFrom(lease.fence)
        run = SagaRun(client, await client.sagas.claim_saga(claim), lease, handlers or {})
        try:
            yield run
        except Exception as exc:
            await run._fail(
                exc, hand_off=compensate == "hand_off", retryable=retryable, retry_after=retry_after
            )
            raise
        # Anything else (a lost lease's cancellation, Ctrl-C) records nothing: once the
        # lease is released or runs out the saga is stale, and its on-stale policy decides.
        await run._complete()


# --- the compensation worker ---------------------------------------------------------------


class CompensationWorker:
    """Claims sagas of ``kind`` that are COMPENSATING and runs their compensations.

    ``run_once()`` handles at most one saga; ``run()`` loops until ``stop`` is set (a saga
    being compensated is finished first). Handlers are looked up by compensation name and
    called with the payload; a compensation without a handler counts as failed (so the
    saga ends QUARANTINED for an operator rather than being claimed over and over).
    """

    def __init__(
        self,
        client: TetherClient,
        kind: str,
        handlers: Mapping[str, Handler],
        *,
        ttl: Seconds = 30,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        poll_interval: float = 1.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.handlers = handlers
        self.ttl = ttl
        self.holder = holder or client.holder
        self.namespace = client.namespace if namespace is None else namespace
        self.wait = wait
        self.poll_interval = poll_interval
        self.stop = stop or asyncio.Event()
        #: Sagas whose compensation this worker finished (any end state), in order.
        self.handled: list[tuple[str, SagaState]] = []

    async def run_once(self) -> SagaState | None:
        """Claim one saga (waiting up to ``wait``) and compensate it: its state afterwards,
        or None when nothing was claimable (or ``stop`` was set while waiting)."""
        key = f"sagas/workers/{self.holder}/{uuid.uuid4().hex}"
        async with self.client.hold(
            key, ttl=self.ttl, holder=self.holder, namespace=self.namespace, on_lost="cancel"
        ) as lease:
            claimed = await self._claim(lease)
            if claimed is None:
                return None

            def fence() -> common_pb2.Fence:
                lease.check()
                return claimed.fence

            compensator = _Compensator(
                self.client, claimed.saga, fence, lambda record: self.handlers.get(record.name)
            )
            state = await compensator.run()
            self.handled.append((claimed.saga.saga_id, state))
            log.info("saga %r compensated: %s", claimed.saga.saga_id, _state_name(state))
            return state

    async def _claim(self, lease: HeldLease) -> saga_pb2.ClaimSagaResponse | None:
        request = saga_pb2.ClaimSagaRequest(
            namespace=self.namespace,
            kind=self.kind,
            purpose=saga_pb2.CLAIM_PURPOSE_COMPENSATE,
            existing_lease=lease.fence,
            wait=to_duration(self.wait),
        )
        claiming = asyncio.ensure_future(self.client.sagas.claim_saga(request))
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
                await self._pause(self.client.retry_policy.delay(failures))
                continue
            failures = 0
            if state is None:
                await self._pause(self.poll_interval)

    async def _pause(self, seconds: float) -> None:
        if self.stop.is_set():
            return
        sleeping = asyncio.ensure_future(self.client.clock.sleep(seconds))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopping.cancel()


__all__ = [
    "FENCED_OUT",
    "CompensateMode",
    "CompensationWorker",
    "Handler",
    "OnStale",
    "SagaRun",
    "from_struct",
    "from_value",
    "run_saga",
    "to_struct",
    "to_value",
]
