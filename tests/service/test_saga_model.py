"""SagaService against a model of docs/sagas.md: a hypothesis state machine drives random
sequences of every saga call on both backends: creates (again, with the same or another
body), claims by id or by kind for either purpose under a new lease or a worker's own
lease, steps, heartbeats, completions, failures (retryable or not, handed off or not),
compensations, cancels, quarantines, redrives, manual compensations, annotations, with
fences from earlier claims too, while the fake clock moves (to exact lease deadlines as
well) and an admin revokes leases. After each call, every saga of the run as ListSagas
shows it (stale_only too), and the sagas the call was about as GetSaga shows them (logs
included), must be what the model says; a refused call must leave its saga byte for
byte as it was (revision included). At the end of each run, WatchSagas must end where
GetSaga is.

The in-process server runs on the test's event loop; the state machine runs in a worker
thread (hypothesis drives it synchronously) and submits each call to that loop. Each run
of the machine works on sagas of its own kind, so earlier runs never get in the way.

The model follows the contract; the targeted tests at the end of this file pin the
places where an earlier server departed from it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from tether_client.pb import common_pb2, lease_pb2, saga_pb2

from .conftest import Harness, dur, ts_us
from .saga_support import (
    AE,
    C_EXHAUSTED,
    C_FAIL,
    C_MANUAL,
    C_OK,
    C_PENDING,
    CANCELLED,
    COMPENSATE,
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    EXECUTE,
    FAILED,
    FP,
    IA,
    NF,
    ON_STALE_COMPENSATE,
    ON_STALE_QUARANTINE,
    PLANNED,
    QUARANTINED,
    REQUEUE,
    RESUME,
    RETRY_COMPENSATIONS,
    RUNNING,
    STARTED,
    STEP_FAILED,
    SUCCEEDED,
    TERMINAL,
    Refusal,
    SagaApi,
    comp,
    fence_of,
    outcome,
    saga_api_for,
)

S = 1_000_000
TTL_S = 10
MAX_SAGAS = 12
MAX_LIVE_SAGAS = 3
HOLDERS = ("w1", "w2")
BOGUS = ("f" * 32, 999_999)
# Claims settle at most this many candidates (units._MAX_SETTLED_PER_CLAIM); never reached.
MAX_SETTLED = 32

Err = tuple[grpc.StatusCode, str]
E_TERMINAL: Err = (FP, "SAGA_TERMINAL")
E_STALE: Err = (FP, "STALE_FENCING_TOKEN")
E_STATE: Err = (FP, "INVALID_SAGA_STATE")
E_EXPIRED: Err = (FP, "LEASE_EXPIRED")
E_CLAIMED: Err = (FP, "SAGA_CLAIMED")
E_NOTHING: Err = (FP, "NOTHING_CLAIMABLE")
E_HELD: Err = (FP, "LEASE_HELD")
E_CONFLICT: Err = (FP, "STEP_CONFLICT")
E_ORDER: Err = (FP, "COMPENSATION_OUT_OF_ORDER")
E_NO_STEP: Err = (NF, "STEP_NOT_FOUND")
E_FIELD: Err = (IA, "INVALID_FIELD")
E_EXISTS: Err = (AE, "REQUEST_ID_CONFLICT")
E_RELEASED: Err = (FP, "LEASE_RELEASED")
E_REVOKED: Err = (FP, "LEASE_REVOKED")

# ---- the model -----------------------------------------------------------------------------


@dataclass
class MLease:
    """A lease: one created for a claim (key ``sagas/<id>``) or a worker's own (key
    ``workers/<kind>/<holder>``, acquired through the lease service). Its id is learned
    from the server's answer."""

    token: int
    holder: str
    expires_at_us: int
    ttl_us: int = TTL_S * S
    lease_id: str = ""
    ended: str | None = None  # RELEASED or REVOKED

    def live(self, now_us: int) -> bool:
        return self.ended is None and now_us < self.expires_at_us

    @property
    def end_error(self) -> Err:
        return {"RELEASED": E_RELEASED, "REVOKED": E_REVOKED}.get(self.ended or "", E_EXPIRED)


@dataclass
class MClaim:
    lease: MLease
    token: int
    purpose: int
    holder: str
    # The claim created its lease (new_lease): the lease ends with the claim.
    owns: bool
    active: bool = True

    @property
    def fence(self) -> tuple[str, int]:
        return self.lease.lease_id, self.token


@dataclass
class MStep:
    name: str
    status: int
    attempt: int
    comp: tuple[str, int] | None  # (name, max_attempts)


@dataclass
class MComp:
    name: str
    status: int
    attempts: int
    max_attempts: int

    @property
    def done(self) -> bool:
        return self.status in (C_OK, C_MANUAL)


@dataclass
class MSaga:
    saga_id: str
    on_stale: int
    max_attempts: int
    not_before_us: int
    state: int = PLANNED
    attempt: int = 0
    attempt_base: int = 0
    claim: MClaim | None = None
    # The last lease granted on the saga's key "sagas/<id>".
    lease: MLease | None = None
    steps: dict[int, MStep] = field(default_factory=dict)
    comps: dict[int, MComp] = field(default_factory=dict)
    progress: bytes = b""
    annotations: int = 0
    # The failure reason when the model knows it exactly (set by FailSaga), else None.
    reason: str | None = ""
    revision: int = 0
    create_revision: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def active(self) -> bool:
        return self.claim is not None and self.claim.active

    def claim_live(self, now_us: int) -> bool:
        c = self.claim
        return c is not None and c.active and c.token == c.lease.token and c.lease.live(now_us)

    def stale(self, now_us: int) -> bool:
        # Stale: a claim whose lease ended; a saga handed off (no claim) is waiting, not stale.
        return self.state in (RUNNING, COMPENSATING) and self.active and not self.claim_live(now_us)

    def end_claim(self, now_us: int) -> None:
        """The claim ends, and with it the lease it created (released if still live); a
        lease of the caller's is left alone."""
        c = self.claim
        if c is None or not c.active:
            return
        c.active = False
        if c.owns and c.lease.live(now_us):
            c.lease.ended = "RELEASED"


@dataclass
class Expect:
    """What the model says a call does: its refusal (None: accepted), which sagas get a new
    revision, and whether the call repeats an earlier one (accepted, nothing changes)."""

    error: Err | None = None
    bumped: set[str] = field(default_factory=set)
    # A claim: which saga it takes, and whether its lease is the key's live one, reused.
    taken: str | None = None
    reused_lease: bool = False


class Model:
    def __init__(self, now: Callable[[], int]) -> None:
        self.now = now
        self.sagas: dict[str, MSaga] = {}
        # Each holder's own lease, for claims made with existing_lease.
        self.workers: dict[str, MLease] = {}

    # -- what time decided --

    def begin_compensation(
        self, s: MSaga, reason: str | None, *, keep_claim: bool = False, cancelled: bool = False
    ) -> None:
        records = {
            i: MComp(step.comp[0], C_PENDING, 0, step.comp[1])
            for i, step in s.steps.items()
            if step.comp is not None
        }
        s.reason = reason
        if not records:
            s.state = CANCELLED if cancelled else FAILED
            s.end_claim(self.now())
            return
        s.state = COMPENSATING
        s.comps = records
        if not keep_claim:
            s.end_claim(self.now())

    def settle(self, s: MSaga, bumped: set[str]) -> None:
        """A stale claim meets its on-stale policy (docs/sagas.md, Stale workers)."""
        if not s.stale(self.now()):
            return
        if s.on_stale == ON_STALE_QUARANTINE:
            s.state = QUARANTINED
            s.end_claim(self.now())
            s.reason = None
            bumped.add(s.saga_id)
        elif s.state == COMPENSATING or (
            s.on_stale == REQUEUE and s.attempt - s.attempt_base < s.max_attempts
        ):
            s.end_claim(self.now())  # claimable again: a CLAIM_ENDED event
            bumped.add(s.saga_id)
        else:
            self.begin_compensation(s, None)
            bumped.add(s.saga_id)

    # -- claims --

    def claimable_error(self, s: MSaga, purpose: int) -> Err | None:
        if s.terminal:
            return E_TERMINAL
        if s.active:
            return E_CLAIMED
        if purpose == EXECUTE:
            if s.state == PLANNED:
                return E_NOTHING if self.now() < s.not_before_us else None
            return None if s.state == RUNNING else E_STATE
        return None if s.state == COMPENSATING else E_STATE

    def candidate(self, s: MSaga, purpose: int) -> bool:
        """The store's queue queries: what a claim by kind looks at (and settles)."""
        dead = not s.claim_live(self.now()) if s.claim is not None else True
        if purpose == EXECUTE:
            return (s.state == PLANNED and s.not_before_us <= self.now()) or (
                s.state == RUNNING and (not s.active or dead)
            )
        return (s.state == COMPENSATING and (not s.active or dead)) or (
            s.state == RUNNING and s.active and dead
        )

    def claim(self, saga_id: str | None, purpose: int, holder: str, existing: bool) -> Expect:
        expect = Expect()
        if saga_id is not None:
            s = self.sagas[saga_id]
            self.settle(s, expect.bumped)
            expect.error = self.claimable_error(s, purpose)
            if expect.error is None:
                self.take(s, purpose, holder, existing, expect)
            return expect
        for _ in range(MAX_SETTLED):
            found = [s for _, s in sorted(self.sagas.items()) if self.candidate(s, purpose)]
            if not found:
                break
            s = found[0]
            self.settle(s, expect.bumped)
            if self.claimable_error(s, purpose) is None:
                self.take(s, purpose, holder, existing, expect)
                return expect
        expect.error = E_NOTHING
        return expect

    def take(self, s: MSaga, purpose: int, holder: str, existing: bool, expect: Expect) -> None:
        now = self.now()
        if existing:
            lease = self.workers[holder]
            if not lease.live(now):
                expect.error = lease.end_error
                return
            s.claim = MClaim(lease, lease.token, purpose, holder, owns=False)
        else:
            key_lease = s.lease
            if key_lease is not None and key_lease.live(now):
                # Only an active claim holds a live lease on the key (ending a claim
                # releases it), and an actively claimed saga is refused SAGA_CLAIMED first.
                if key_lease.holder != holder:
                    expect.error = E_HELD
                    return
                expect.reused_lease = True
            else:
                token = key_lease.token + 1 if key_lease is not None else 1
                s.lease = MLease(token, holder, now + TTL_S * S)
            assert s.lease is not None
            s.claim = MClaim(s.lease, s.lease.token, purpose, holder, owns=True)
        if purpose == EXECUTE:
            s.attempt += 1
            s.state = RUNNING
        expect.taken = s.saga_id
        expect.bumped.add(s.saga_id)

    # -- fenced calls --

    def check_fence(self, s: MSaga, fence: tuple[str, int]) -> Err | None:
        if s.terminal:
            return E_TERMINAL
        if s.claim is None or s.claim.fence != fence:
            return E_STALE
        if not s.claim.active:
            lease = s.claim.lease
            # A claim ended after its lease ran out or was revoked: the lease says why.
            if lease.ended != "RELEASED" and not lease.live(self.now()):
                return lease.end_error
            return E_STATE
        if not s.claim_live(self.now()):
            return s.claim.lease.end_error
        return None

    def record_step(
        self,
        s: MSaga,
        fence: tuple[str, int],
        index: int,
        name: str,
        status: int,
        compensation: tuple[str, int] | None,
    ) -> Expect:
        error = self.check_fence(s, fence)
        if error is not None:
            return Expect(error)
        if s.state != RUNNING:
            return Expect(E_STATE)
        existing = s.steps.get(index)
        if existing is None:
            if index != len(s.steps):
                return Expect(E_FIELD)
            s.steps[index] = MStep(name, status, s.attempt, compensation)
            return Expect(bumped={s.saga_id})
        if existing.name != name:
            return Expect(E_CONFLICT)
        if existing.status == status and (
            existing.attempt == s.attempt or existing.status == SUCCEEDED
        ):
            return Expect()  # idempotent: the step as it is
        if existing.status == SUCCEEDED:
            return Expect(E_CONFLICT)  # a step that succeeded stays succeeded
        existing.status = status
        existing.attempt = s.attempt
        existing.comp = compensation or existing.comp
        return Expect(bumped={s.saga_id})

    def heartbeat(self, s: MSaga, fence: tuple[str, int], progress: bytes) -> Expect:
        error = self.check_fence(s, fence)
        if error is not None:
            return Expect(error)
        assert s.claim is not None
        lease = s.claim.lease
        lease.expires_at_us = max(lease.expires_at_us, self.now() + lease.ttl_us)
        if progress:
            s.progress = progress
        return Expect()  # progress is not a revision

    def complete(self, s: MSaga, fence: tuple[str, int]) -> Expect:
        if s.claim is not None and s.claim.fence == fence and s.state == COMPLETED:
            return Expect()  # a retry of the call that completed it
        error = self.check_fence(s, fence) or (E_STATE if s.state != RUNNING else None)
        if error is not None:
            return Expect(error)
        s.state = COMPLETED
        s.end_claim(self.now())
        s.reason = ""
        return Expect(bumped={s.saga_id})

    def fail(
        self,
        s: MSaga,
        fence: tuple[str, int],
        reason: str,
        retryable: bool,
        hand_off: bool,
        retry_after_s: int,
    ) -> Expect:
        if (
            s.claim is not None
            and s.claim.fence == fence
            and s.state not in (RUNNING, COMPLETED)
            and s.reason == reason
        ):
            return Expect()  # a retry of the call that failed it
        error = self.check_fence(s, fence) or (E_STATE if s.state != RUNNING else None)
        if error is not None:
            return Expect(error)
        if retryable and s.attempt - s.attempt_base < s.max_attempts:
            s.state = PLANNED
            s.end_claim(self.now())
            s.reason = reason
            s.not_before_us = self.now() + retry_after_s * S
        else:
            self.begin_compensation(s, reason, keep_claim=not hand_off)
        return Expect(bumped={s.saga_id})

    def next_compensation(self, s: MSaga) -> int | None:
        pending = [i for i, c in s.comps.items() if not c.done]
        return max(pending) if pending else None

    def record_compensation(
        self, s: MSaga, fence: tuple[str, int], step_index: int, succeeded: bool, attempt: int
    ) -> Expect:
        error = self.check_fence(s, fence) or (E_STATE if s.state != COMPENSATING else None)
        if error is not None:
            return Expect(error)
        record = s.comps.get(step_index)
        if record is None:
            return Expect(E_NO_STEP)
        attempt = attempt or record.attempts + 1
        if attempt <= record.attempts or record.done:
            return Expect()  # that attempt is already recorded
        if attempt > record.attempts + 1:
            return Expect(E_FIELD)
        if self.next_compensation(s) != step_index:
            return Expect(E_ORDER)
        record.attempts = attempt
        if succeeded:
            record.status = C_OK
        else:
            record.status = C_EXHAUSTED if attempt >= record.max_attempts else C_FAIL
        if all(c.done for c in s.comps.values()):
            s.state = COMPENSATED
            s.end_claim(self.now())
        elif record.status == C_EXHAUSTED:
            s.state = QUARANTINED
            s.end_claim(self.now())
            s.reason = None
        return Expect(bumped={s.saga_id})

    # -- cancel and operators --

    def cancel(self, s: MSaga) -> Expect:
        if s.state in (CANCELLED, COMPENSATING):
            return Expect()  # cancelled already, or compensating to the end anyway
        if s.terminal:
            return Expect(E_TERMINAL)
        if s.attempt == 0:
            s.state = CANCELLED
            s.end_claim(self.now())
            s.reason = None
        else:
            self.begin_compensation(s, None, cancelled=True)
        s.annotations += 1
        return Expect(bumped={s.saga_id})

    def quarantine(self, s: MSaga) -> Expect:
        if s.state == QUARANTINED:
            return Expect()
        if s.terminal:
            return Expect(E_TERMINAL)
        s.state = QUARANTINED
        s.end_claim(self.now())
        s.reason = None
        s.annotations += 1
        return Expect(bumped={s.saga_id})

    def redrive(self, s: MSaga, mode: int) -> Expect:
        if s.state != QUARANTINED:
            return Expect(E_TERMINAL if s.terminal else E_STATE)
        if mode == RESUME:
            # Refused once any compensation has run (done, or attempted).
            if any(c.done or c.attempts > 0 for c in s.comps.values()):
                return Expect(E_STATE)
            s.state = PLANNED
            s.attempt_base = s.attempt
            s.not_before_us = self.now()
            s.reason = ""
            s.comps = {}
        elif not s.comps:
            self.begin_compensation(s, s.reason)
        else:
            for record in s.comps.values():
                if not record.done:
                    record.status, record.attempts = C_PENDING, 0
            s.state = COMPENSATING
        s.end_claim(self.now())
        # The redriven saga forgets the quarantined claim's fence.
        s.claim = None
        s.annotations += 1
        return Expect(bumped={s.saga_id})

    def mark(self, s: MSaga, step_index: int) -> Expect:
        if s.state not in (COMPENSATING, QUARANTINED):
            return Expect(E_TERMINAL if s.terminal else E_STATE)
        records = s.comps or {
            i: MComp(step.comp[0], C_PENDING, 0, step.comp[1])
            for i, step in s.steps.items()
            if step.comp is not None
        }
        record = records.get(step_index)
        if record is None:
            return Expect(E_NO_STEP)
        if record.done:
            return Expect()
        record.status = C_MANUAL
        s.comps = records
        s.annotations += 1
        if all(c.done for c in records.values()):
            s.state = COMPENSATED
            s.end_claim(self.now())
        return Expect(bumped={s.saga_id})

    def annotate(self, s: MSaga) -> Expect:
        s.annotations += 1
        return Expect(bumped={s.saga_id})


# ---- comparing the server with the model ----------------------------------------------------


def observed(saga: saga_pb2.Saga, *, logs: bool = True) -> dict[str, Any]:
    """What the model predicts about a saga, as the server shows it."""
    seen = {
        "state": saga_pb2.SagaState.Name(saga.state),
        "attempt": saga.attempt,
        "max_attempts": saga.max_attempts,
        "on_stale": saga.on_stale,
        "claim": (saga.claim.lease_id, saga.claim.fencing_token, saga.claim_purpose, saga.holder)
        if saga.HasField("claim")
        else None,
        "stale": saga.stale,
        "overdue": saga.overdue,
        "ended": saga.HasField("ended_at"),
        "not_before_us": ts_us(saga.not_before),
        "progress": saga.progress,
        "annotations": len(saga.annotations),
        "steps": [
            (
                s.index,
                s.name,
                saga_pb2.StepStatus.Name(s.status),
                s.attempt,
                (s.compensation.name, s.compensation.max_attempts)
                if s.HasField("compensation")
                else None,
                s.HasField("finished_at"),
            )
            for s in saga.steps
        ],
        "compensations": [
            (
                c.step_index,
                c.name,
                saga_pb2.CompensationStatus.Name(c.status),
                c.attempts,
                c.max_attempts,
                c.marked_by,
            )
            for c in saga.compensations
        ],
    }
    return seen if logs else {k: v for k, v in seen.items() if k not in LOGS}


def predicted(s: MSaga, now_us: int, *, logs: bool = True) -> dict[str, Any]:
    c = s.claim
    expected = {
        "state": saga_pb2.SagaState.Name(s.state),
        "attempt": s.attempt,
        "max_attempts": s.max_attempts,
        "on_stale": s.on_stale,
        "claim": (c.lease.lease_id, c.token, c.purpose, c.holder)
        if c is not None and c.active
        else None,
        "stale": s.stale(now_us),
        "overdue": False,
        "ended": s.terminal,
        "not_before_us": s.not_before_us,
        "progress": s.progress,
        "annotations": s.annotations,
        "steps": [
            (
                i,
                st_.name,
                saga_pb2.StepStatus.Name(st_.status),
                st_.attempt,
                st_.comp,
                st_.status != STARTED,  # finished
            )
            for i, st_ in sorted(s.steps.items())
        ],
        "compensations": [
            (
                i,
                r.name,
                saga_pb2.CompensationStatus.Name(r.status),
                r.attempts,
                r.max_attempts,
                "anonymous" if r.status == C_MANUAL else "",  # marked by
            )
            for i, r in sorted(s.comps.items(), reverse=True)
        ],
    }
    return expected if logs else {k: v for k, v in expected.items() if k not in LOGS}


# ListSagas leaves these out.
LOGS = frozenset({"annotations", "steps", "compensations"})


# ---- driving the server from the machine's thread ----------------------------------------


def claimed(s: MSaga) -> bool:
    return s.active


def running(s: MSaga) -> bool:
    return s.active and s.state == RUNNING


def compensating(s: MSaga) -> bool:
    return s.active and s.state == COMPENSATING


def claimable(s: MSaga) -> bool:
    return not s.active and s.state in (PLANNED, RUNNING, COMPENSATING)


def compensable(s: MSaga) -> bool:
    return s.state in (QUARANTINED, COMPENSATING)


def pb_fence(fence: tuple[str, int]) -> common_pb2.Fence:
    return common_pb2.Fence(lease_id=fence[0], fencing_token=fence[1])


class Driver:
    """Runs coroutines on the test's event loop (where the server lives) from the
    machine's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tether: Harness, api: SagaApi) -> None:
        self.loop = loop
        self.tether = tether
        self.api = api
        # (rule, outcome) -> count, to show (and check) what the runs covered.
        self.tally: Counter[tuple[str, Any]] = Counter()

    def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """``make()`` and await it on the loop (a gRPC call starts when it is made)."""

        async def wrapped() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=60)

    def call(self, make: Callable[[SagaApi], Awaitable[Any]]) -> Any:
        return self.run(lambda: outcome(make(self.api)))

    def advance_to(self, now_us: int) -> None:
        async def advance() -> None:
            self.tether.clock.set(now_us)

        self.run(advance)

    def now(self) -> int:
        return self.tether.clock.now_us()


_runs = itertools.count()
_names = itertools.count()

pick = st.integers(0, 11)
policies = st.sampled_from([REQUEUE, ON_STALE_COMPENSATE, ON_STALE_QUARANTINE, 0])
fence_choice = st.sampled_from(["current", "current", "current", "older", "bogus"])


# The actions a step of the machine picks from, with their weights and arguments: a
# worker's happy path (claim, next step, next compensation) weighs most; every other call
# and every argument (stale fences included) comes up too.
ACTIONS: dict[str, tuple[int, st.SearchStrategy[dict[str, Any]]]] = {
    "create_new": (
        2,
        st.fixed_dictionaries({"on_stale": policies, "max_attempts": st.sampled_from([1, 2, 0])}),
    ),
    "create_again": (1, st.fixed_dictionaries({"n": pick, "same": st.booleans()})),
    "claim_by_id": (
        4,
        st.fixed_dictionaries(
            {
                "n": pick,
                "purpose": st.sampled_from([EXECUTE, EXECUTE, COMPENSATE]),
                "holder": st.sampled_from(HOLDERS),
                "existing": st.sampled_from([False, False, True]),
            }
        ),
    ),
    "claim_by_kind": (
        3,
        st.fixed_dictionaries(
            {
                "purpose": st.sampled_from([EXECUTE, COMPENSATE]),
                "holder": st.sampled_from(HOLDERS),
                "existing": st.sampled_from([False, False, True]),
            }
        ),
    ),
    "work_step": (
        8,
        st.fixed_dictionaries(
            {
                "n": pick,
                "next_one": st.booleans(),
                "status": st.sampled_from([STARTED, SUCCEEDED, SUCCEEDED, STEP_FAILED]),
                "compensation": st.sampled_from([None, 1, 2, 0]),
            }
        ),
    ),
    "record_step": (
        3,
        st.fixed_dictionaries(
            {
                "n": pick,
                "choice": fence_choice,
                "older": st.integers(0, 5),
                "which": st.sampled_from(["next", "last", "first", "skip"]),
                "right_name": st.integers(0, 5),
                "status": st.sampled_from([STARTED, SUCCEEDED, STEP_FAILED]),
                "compensation": st.sampled_from([None, None, 1, 2, 0]),
            }
        ),
    ),
    "heartbeat": (
        2,
        st.fixed_dictionaries(
            {
                "n": pick,
                "choice": fence_choice,
                "older": st.integers(0, 5),
                "progress": st.binary(max_size=8),
            }
        ),
    ),
    "complete": (
        2,
        st.fixed_dictionaries({"n": pick, "choice": fence_choice, "older": st.integers(0, 5)}),
    ),
    "fail": (
        4,
        st.fixed_dictionaries(
            {
                "n": pick,
                "choice": fence_choice,
                "older": st.integers(0, 5),
                "retryable": st.sampled_from([False, False, True]),
                "hand_off": st.sampled_from([False, False, True]),
                "retry_after": st.sampled_from([0, 0, 3]),
                "repeat": st.integers(0, 4),
            }
        ),
    ),
    "work_compensation": (
        8,
        st.fixed_dictionaries({"n": pick, "succeeded": st.sampled_from([True, True, False])}),
    ),
    "record_compensation": (
        2,
        st.fixed_dictionaries(
            {
                "n": pick,
                "choice": fence_choice,
                "older": st.integers(0, 5),
                "which": st.sampled_from(["next", "next", "other", "missing"]),
                "other": st.integers(0, 5),
                "succeeded": st.booleans(),
                "attempt": st.sampled_from(["auto", "explicit", "repeat", "skip"]),
            }
        ),
    ),
    "cancel_or_quarantine": (2, st.fixed_dictionaries({"n": pick, "quarantine": st.booleans()})),
    "redrive": (
        2,
        st.fixed_dictionaries({"n": pick, "mode": st.sampled_from([RETRY_COMPENSATIONS, RESUME])}),
    ),
    "mark_step_compensated": (
        2,
        st.fixed_dictionaries(
            {
                "n": pick,
                "which": st.sampled_from(["next", "other", "missing"]),
                "other": st.integers(0, 5),
            }
        ),
    ),
    "annotate": (1, st.fixed_dictionaries({"n": pick})),
    "advance": (1, st.fixed_dictionaries({"seconds": st.sampled_from([1, 2, 3, TTL_S + 1])})),
    "expire": (1, st.fixed_dictionaries({"n": pick})),
    "acquire_worker_lease": (
        1,
        st.fixed_dictionaries(
            {"holder": st.sampled_from(HOLDERS), "ttl_s": st.sampled_from([TTL_S, 3 * TTL_S])}
        ),
    ),
    "revoke_lease": (1, st.fixed_dictionaries({"n": pick})),
}


class SagaMachine(RuleBasedStateMachine):
    driver: Driver

    def __init__(self) -> None:
        super().__init__()
        self.run_id = next(_runs)
        self.kind = f"model-{self.run_id}"
        self.model = Model(self.driver.now)
        self.fences: dict[str, list[tuple[str, int]]] = {}
        self.bodies: dict[str, tuple[int, int]] = {}
        self.last_reason: dict[str, str] = {}
        # The saga the current action is about (GetSaga'd with its logs after it).
        self.target: str | None = None

    def teardown(self) -> None:
        """WatchSagas for this run's kind, from its first revision, ends where GetSaga is:
        revisions strictly increase, and each saga's last event is its current state and
        revision."""
        if not self.model.sagas:
            return
        first = min(s.create_revision for s in self.model.sagas.values())
        last = max(s.revision for s in self.model.sagas.values())

        async def read() -> list[saga_pb2.SagaEvent]:
            call = self.driver.api.stub.WatchSagas(
                saga_pb2.WatchSagasRequest(kind=self.kind, start_revision=first), timeout=30
            )
            events: list[saga_pb2.SagaEvent] = []
            try:
                async for message in call:
                    events.extend(message.events)
                    if events and events[-1].revision >= last:
                        return events
            finally:
                call.cancel()
            raise AssertionError("the watch ended early")

        events = self.driver.run(read)
        revisions = [e.revision for e in events]
        assert revisions == sorted(set(revisions)), revisions
        final = {e.saga.saga_id: e.saga for e in events}
        assert set(final) == set(self.model.sagas)
        for saga_id, s in self.model.sagas.items():
            assert final[saga_id].revision == s.revision, saga_id
            assert final[saga_id].state == s.state, saga_id
        self.tally("watch events", "ok")

    # -- helpers --

    def saga(self, index: int, want: Callable[[MSaga], bool] = lambda s: not s.terminal) -> MSaga:
        """Mostly a saga the rule can do something with (``want``), sometimes any."""
        every = [s for _, s in sorted(self.model.sagas.items())]
        wanted = [s for s in every if want(s)]
        pool = wanted if wanted and index % 4 != 3 else every
        chosen = pool[index % len(pool)]
        self.target = chosen.saga_id
        return chosen

    def fence(self, s: MSaga, choice: str, older: int) -> tuple[str, int]:
        seen = self.fences.get(s.saga_id, [])
        if choice == "bogus" or not seen:
            return BOGUS
        if choice == "older":
            return seen[older % len(seen)]
        return seen[-1]

    def get_bytes(self, saga_id: str | None) -> bytes:
        got = self.driver.call(lambda api: api.get(saga_id or ""))
        assert not isinstance(got, Refusal), got
        data: bytes = got.SerializeToString(deterministic=True)
        return data

    def tally(self, name: str, result: Any) -> None:
        self.driver.tally[(name, result)] += 1

    def apply(
        self,
        name: str,
        op: Callable[[], Expect],
        call: Callable[[SagaApi], Awaitable[Any]],
        *,
        keeps_settlement: bool = False,
    ) -> tuple[Expect, Any]:
        """Predict with the model, make the call, compare. A refused call changes nothing
        (but what a claim settles first)."""
        before = copy.deepcopy((self.model.sagas, self.model.workers))
        expect = op()
        unchanged = expect.error is not None and not keeps_settlement
        if unchanged:
            self.model.sagas, self.model.workers = before
            expect.bumped = set()
        # A call the model refuses leaves the saga byte for byte as GetSaga showed it.
        saga_before = self.get_bytes(self.target) if unchanged and self.target else None
        result = self.driver.call(call)
        if saga_before is not None:
            assert self.get_bytes(self.target) == saga_before, f"{name} refused, but changed"
        if expect.error is None:
            assert not isinstance(result, Refusal), (
                f"model accepts, server refused {result.code.name}/{result.reason}: "
                f"{result.details}"
            )
        else:
            assert isinstance(result, Refusal), f"model refuses {expect.error}, server accepted"
            assert result.key == expect.error, (
                f"model refuses {expect.error}, server {result.key}: {result.details}"
            )
        self.tally(name, expect.error[1] if expect.error else "ok")
        return expect, result

    def check(self, expect: Expect, answered: saga_pb2.Saga | None = None) -> None:
        """Every saga of this run as listed (all but its logs), and the sagas the action was
        about or changed as GetSaga shows them (logs included), against the model. A saga
        whose revision did not move has the logs it had: every log write is a revision."""
        now = self.driver.now()
        listed = self.driver.call(lambda api: api.list_all(kind=self.kind))
        assert not isinstance(listed, Refusal), listed
        by_id = {saga.saga_id: saga for saga in listed}
        assert set(by_id) == set(self.model.sagas)
        detailed = expect.bumped | {self.target, expect.taken} - {None}
        for saga_id, s in sorted(self.model.sagas.items()):
            got = by_id[saga_id]
            want = predicted(s, now)
            assert observed(got, logs=False) == predicted(s, now, logs=False), saga_id
            if s.reason is not None:
                assert got.failure_reason == s.reason, saga_id
            if saga_id in expect.bumped:
                assert got.revision > s.revision, f"{saga_id}: no new revision"
            else:
                assert got.revision == s.revision, f"{saga_id}: revision moved"
            s.revision = got.revision
            if saga_id in detailed:
                full = self.driver.call(lambda api, saga_id=saga_id: api.get(saga_id))
                assert not isinstance(full, Refusal), full
                assert observed(full) == want, saga_id
                assert full.revision == s.revision, saga_id
        stale = self.driver.call(lambda api: api.list_all(kind=self.kind, stale_only=True))
        assert not isinstance(stale, Refusal), stale
        assert {saga.saga_id for saga in stale} == {
            saga_id for saga_id, s in self.model.sagas.items() if s.stale(now)
        }
        if answered is not None:
            assert observed(answered) == predicted(self.model.sagas[answered.saga_id], now)

    # -- the rule: one action, drawn by weight --

    @rule(data=st.data())
    def act(self, data: st.DataObject) -> None:
        self.target = None
        names = [
            name
            for name, (weight, _) in ACTIONS.items()
            for _ in range(weight if self.useful(name) else 1)
        ]
        name = data.draw(st.sampled_from(names), label="action")
        arguments = data.draw(ACTIONS[name][1], label=name)
        note(f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})")
        getattr(self, name)(**arguments)

    def useful(self, action: str) -> bool:
        """Whether some saga is in a state where the action can get somewhere; the others
        are drawn rarely (but still drawn: refusals are part of the contract)."""
        sagas = list(self.model.sagas.values())
        wanted: Callable[[MSaga], bool] = {
            "work_step": running,
            "record_step": running,
            "complete": running,
            "fail": running,
            "heartbeat": claimed,
            "work_compensation": compensating,
            "record_compensation": compensating,
            "claim_by_id": claimable,
            "claim_by_kind": claimable,
            "redrive": compensable,
            "revoke_lease": claimed,
            "mark_step_compensated": compensable,
        }.get(action, lambda s: not s.terminal)
        if action == "create_new":
            live = sum(not s.terminal for s in sagas)
            return len(sagas) < MAX_SAGAS and live < MAX_LIVE_SAGAS
        always = ("advance", "expire", "acquire_worker_lease")
        return action in always or any(wanted(s) for s in sagas)

    # -- the actions --

    @initialize(on_stale=policies, max_attempts=st.sampled_from([1, 2, 0]))
    def first_saga(self, on_stale: int, max_attempts: int) -> None:
        self.create_new(on_stale, max_attempts)

    def create_new(self, on_stale: int, max_attempts: int) -> None:
        live = sum(not s.terminal for s in self.model.sagas.values())
        if len(self.model.sagas) >= MAX_SAGAS or live >= MAX_LIVE_SAGAS:
            return
        saga_id = f"{self.kind}-{len(self.model.sagas):02d}"
        effective = (on_stale or REQUEUE, max_attempts or 3)
        result = self.driver.call(
            lambda api: api.create(saga_id, self.kind, on_stale=on_stale, max_attempts=max_attempts)
        )
        assert not isinstance(result, Refusal), result
        assert result.created
        self.bodies[saga_id] = effective
        self.model.sagas[saga_id] = MSaga(
            saga_id,
            effective[0],
            effective[1],
            not_before_us=self.driver.now(),
            create_revision=result.saga.create_revision,
        )
        self.tally("create_new", "ok")
        self.check(Expect(bumped={saga_id}), result.saga)

    def create_again(self, n: int, same: bool) -> None:
        s = self.saga(n)
        on_stale, max_attempts = self.bodies[s.saga_id]
        if not same:
            max_attempts += 1
        expect, result = self.apply(
            "create_again",
            lambda: Expect() if same else Expect(E_EXISTS),
            lambda api: api.create(
                s.saga_id, self.kind, on_stale=on_stale, max_attempts=max_attempts
            ),
        )
        if expect.error is None:
            assert result.created is False
        self.check(expect, result.saga if expect.error is None else None)

    def do_claim(
        self, name: str, target: str | None, purpose: int, holder: str, existing: bool
    ) -> None:
        worker = self.model.workers.get(holder)
        existing = existing and worker is not None
        lease_arg: dict[str, Any] = {}
        if existing:
            assert worker is not None
            lease_arg["existing_lease"] = pb_fence((worker.lease_id, worker.token))
        expect, result = self.apply(
            name + (" (own lease)" if existing else ""),
            lambda: self.model.claim(target, purpose, holder, existing),
            lambda api: api.claim(
                target or "",
                kind=self.kind,
                holder=holder,
                ttl_s=TTL_S,
                purpose=purpose,
                **lease_arg,
            ),
            keeps_settlement=True,
        )
        if expect.error is None:
            assert expect.taken is not None
            s = self.model.sagas[expect.taken]
            assert s.claim is not None
            lease = s.claim.lease
            assert result.saga.saga_id == s.saga_id
            assert result.fence.fencing_token == lease.token
            assert result.lease.holder == holder
            assert ts_us(result.lease.expires_at) == lease.expires_at_us
            if existing:
                assert result.lease.key == self.worker_key(holder)
                assert result.fence.lease_id == lease.lease_id
            else:
                assert result.lease.key == f"sagas/{s.saga_id}"
                if expect.reused_lease:
                    assert result.fence.lease_id == lease.lease_id
                else:
                    seen = {f[0] for f in self.fences.get(s.saga_id, [])}
                    assert result.fence.lease_id not in seen
                    lease.lease_id = result.fence.lease_id
            self.fences.setdefault(s.saga_id, []).append(
                (result.fence.lease_id, result.fence.fencing_token)
            )
        self.check(expect, result.saga if expect.error is None else None)

    def claim_by_id(self, n: int, purpose: int, holder: str, existing: bool) -> None:
        self.do_claim("claim_by_id", self.saga(n, claimable).saga_id, purpose, holder, existing)

    def claim_by_kind(self, purpose: int, holder: str, existing: bool) -> None:
        self.do_claim("claim_by_kind", None, purpose, holder, existing)

    def worker_key(self, holder: str) -> str:
        return f"workers/{self.kind}/{holder}"

    def acquire_worker_lease(self, holder: str, ttl_s: int) -> None:
        """A worker takes (or renews by acquiring again) a lease of its own, to claim
        sagas with."""
        now = self.driver.now()
        current = self.model.workers.get(holder)
        result = self.driver.call(
            lambda api: self.driver.tether.stub.Acquire(
                lease_pb2.AcquireRequest(
                    key=self.worker_key(holder), holder=holder, ttl=dur(ttl_s)
                ),
                timeout=30,
            )
        )
        assert not isinstance(result, Refusal), result
        if current is not None and current.live(now):
            assert result.created is False
            assert (result.lease.lease_id, result.lease.fencing_token) == (
                current.lease_id,
                current.token,
            )
        else:
            token = current.token + 1 if current is not None else 1
            assert result.created
            assert result.lease.fencing_token == token
            self.model.workers[holder] = MLease(
                token, holder, now + ttl_s * S, ttl_s * S, result.lease.lease_id
            )
        self.tally("acquire_worker_lease", "ok")
        self.check(Expect())

    def revoke_lease(self, n: int) -> None:
        """An admin revokes the lease of a saga's claim through the lease service."""
        s = self.saga(n, claimed)
        lease = s.claim.lease if s.claim is not None else None
        if lease is None or not lease.live(self.driver.now()):
            self.check(Expect())
            return
        result = self.driver.call(
            lambda api: self.driver.tether.stub.Revoke(
                lease_pb2.RevokeRequest(lease_id=lease.lease_id, reason="admin"), timeout=30
            )
        )
        assert not isinstance(result, Refusal), result
        lease.ended = "REVOKED"
        self.tally("revoke_lease", "ok")
        self.check(Expect())

    def do_step(
        self,
        name: str,
        s: MSaga,
        fence: tuple[str, int],
        index: int,
        step_name: str,
        status: int,
        max_attempts: int | None,
    ) -> None:
        spec = None
        if max_attempts is not None:
            spec = (f"undo-{index}-{next(_names)}", max_attempts or 3)
        expect, result = self.apply(
            name,
            lambda: self.model.record_step(s, fence, index, step_name, status, spec),
            lambda api: api.step(
                s.saga_id,
                pb_fence(fence),
                index,
                step_name,
                status,
                **({"compensation": comp(spec[0], max_attempts or 0)} if spec else {}),
            ),
        )
        if expect.error is None:
            step = s.steps[index]
            assert (result.step.index, result.step.name) == (index, step.name)
            assert result.step.status == step.status
            assert result.state == s.state
        self.check(expect)

    def work_step(self, n: int, next_one: bool, status: int, compensation: int | None) -> None:
        """A worker records its next step (or its last one again) with its current fence."""
        s = self.saga(n, running)
        index = len(s.steps) if next_one or not s.steps else len(s.steps) - 1
        fence = self.fence(s, "current", 0)
        self.do_step("work_step", s, fence, index, f"step-{index}", status, compensation)

    def record_step(
        self,
        n: int,
        choice: str,
        older: int,
        which: str,
        right_name: int,
        status: int,
        compensation: int | None,
    ) -> None:
        s = self.saga(n, running)
        count = len(s.steps)
        index = {"next": count, "last": max(count - 1, 0), "first": 0, "skip": count + 1}[which]
        step_name = f"step-{index}" if right_name else "other"
        fence = self.fence(s, choice, older)
        self.do_step("record_step", s, fence, index, step_name, status, compensation)

    def heartbeat(self, n: int, choice: str, older: int, progress: bytes) -> None:
        s = self.saga(n, claimed)
        fence = self.fence(s, choice, older)
        expect, result = self.apply(
            "heartbeat",
            lambda: self.model.heartbeat(s, fence, progress),
            lambda api: api.heartbeat(s.saga_id, pb_fence(fence), progress),
        )
        if expect.error is None:
            assert s.claim is not None
            assert ts_us(result.expires_at) == s.claim.lease.expires_at_us
            assert result.state == s.state
        self.check(expect)

    def complete(self, n: int, choice: str, older: int) -> None:
        s = self.saga(n, running)
        fence = self.fence(s, choice, older)
        expect, result = self.apply(
            "complete",
            lambda: self.model.complete(s, fence),
            lambda api: api.complete(s.saga_id, pb_fence(fence)),
        )
        self.check(expect, result.saga if expect.error is None else None)

    def fail(
        self,
        n: int,
        choice: str,
        older: int,
        retryable: bool,
        hand_off: bool,
        retry_after: int,
        repeat: int,
    ) -> None:
        s = self.saga(n, running)
        fence = self.fence(s, choice, older)
        if repeat == 0 and s.saga_id in self.last_reason:
            reason = self.last_reason[s.saga_id]
        else:
            reason = f"failure-{next(_names)}"
        expect, result = self.apply(
            "fail",
            lambda: self.model.fail(s, fence, reason, retryable, hand_off, retry_after),
            lambda api: api.fail(
                s.saga_id,
                pb_fence(fence),
                reason=reason,
                retryable=retryable,
                hand_off=hand_off,
                retry_after=dur(retry_after),
            ),
        )
        if expect.error is None:
            self.last_reason[s.saga_id] = reason
            self.tally("fail ->", saga_pb2.SagaState.Name(self.model.sagas[s.saga_id].state))
        self.check(expect, result.saga if expect.error is None else None)

    def do_compensation(
        self,
        name: str,
        s: MSaga,
        fence: tuple[str, int],
        step_index: int,
        succeeded: bool,
        attempt: int,
    ) -> None:
        expect, result = self.apply(
            name,
            lambda: self.model.record_compensation(s, fence, step_index, succeeded, attempt),
            lambda api: api.compensate(
                s.saga_id,
                pb_fence(fence),
                step_index,
                C_OK if succeeded else C_FAIL,
                attempt=attempt,
                error="" if succeeded else "undo failed",
            ),
        )
        if expect.error is None:
            self.tally(name + " ->", saga_pb2.SagaState.Name(s.state))
            assert result.state == s.state
            assert result.compensation.step_index == step_index
            assert result.compensation.status == s.comps[step_index].status
        self.check(expect)

    def work_compensation(self, n: int, succeeded: bool) -> None:
        """A worker reports the next compensation with its current fence."""
        s = self.saga(n, compensating)
        step_index = self.comp_index(s, "next", 0)
        fence = self.fence(s, "current", 0)
        self.do_compensation("work_compensation", s, fence, step_index, succeeded, 0)

    def record_compensation(
        self,
        n: int,
        choice: str,
        older: int,
        which: str,
        other: int,
        succeeded: bool,
        attempt: str,
    ) -> None:
        s = self.saga(n, compensating)
        fence = self.fence(s, choice, older)
        step_index = self.comp_index(s, which, other)
        record = s.comps.get(step_index)
        done = record.attempts if record is not None else 0
        number = {"auto": 0, "explicit": done + 1, "repeat": done, "skip": done + 2}[attempt]
        self.do_compensation("record_compensation", s, fence, step_index, succeeded, number)

    def comp_index(self, s: MSaga, which: str, other: int) -> int:
        if which == "missing":
            return 9
        if which == "next":
            nxt = self.model.next_compensation(s)
            if nxt is not None:
                return nxt
        indexes = sorted(s.comps) or sorted(s.steps) or [0]
        return indexes[other % len(indexes)]

    def cancel_or_quarantine(self, n: int, quarantine: bool) -> None:
        s = self.saga(n)
        if quarantine:
            expect, result = self.apply(
                "quarantine",
                lambda: self.model.quarantine(s),
                lambda api: api.quarantine(s.saga_id, "look"),
            )
        else:
            expect, result = self.apply(
                "cancel", lambda: self.model.cancel(s), lambda api: api.cancel(s.saga_id, "stop")
            )
        self.check(expect, result.saga if expect.error is None else None)

    def redrive(self, n: int, mode: int) -> None:
        s = self.saga(n, compensable)
        expect, result = self.apply(
            "redrive",
            lambda: self.model.redrive(s, mode),
            lambda api: api.redrive(s.saga_id, mode, "again"),
        )
        self.check(expect, result.saga if expect.error is None else None)

    def mark_step_compensated(self, n: int, which: str, other: int) -> None:
        s = self.saga(n, compensable)
        step_index = self.comp_index(s, which, other)
        expect, result = self.apply(
            "mark_step_compensated",
            lambda: self.model.mark(s, step_index),
            lambda api: api.mark(s.saga_id, step_index, "done by hand"),
        )
        self.check(expect, result.saga if expect.error is None else None)

    def annotate(self, n: int) -> None:
        s = self.saga(n)
        expect, _ = self.apply(
            "annotate",
            lambda: self.model.annotate(s),
            lambda api: api.annotate(s.saga_id, "audit"),
        )
        self.check(expect)

    def advance(self, seconds: int) -> None:
        self.driver.advance_to(self.driver.now() + seconds * S)
        self.tally("advance", "ok")
        self.check(Expect())

    def expire(self, n: int) -> None:
        """Advance exactly to the deadline of a saga's claim lease: at the deadline itself
        the lease is no longer live."""
        s = self.saga(n, claimed)
        lease = s.claim.lease if s.claim is not None else s.lease
        now = self.driver.now()
        if lease is not None and lease.expires_at_us > now:
            self.driver.advance_to(lease.expires_at_us)
            self.tally("expire", "ok")
        self.check(Expect())


# TETHER_SAGA_MODEL_EXAMPLES=500 explores longer (minutes) than the suite's default.
MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("TETHER_SAGA_MODEL_EXAMPLES", "20")),
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture
async def model_api(tether: Harness) -> SagaApi:
    return await saga_api_for(tether)


@pytest.mark.timeout(300)
async def test_saga_service_follows_the_model(tether: Harness, model_api: SagaApi) -> None:
    driver = Driver(asyncio.get_running_loop(), tether, model_api)

    class Machine(SagaMachine):
        pass

    Machine.driver = driver
    await asyncio.to_thread(run_state_machine_as_test, Machine, settings=MACHINE_SETTINGS)
    for (name, result), count in sorted(driver.tally.items()):
        print(f"{name:24} {result:28} {count}")


# ---- contract examples next to the model ------------------------------------------------------


@pytest.mark.parametrize("end", ["revoke", "release"])
async def test_a_claim_whose_lease_is_revoked_or_released_is_fenced_out(
    tether: Harness, model_api: SagaApi, end: str
) -> None:
    """An admin revokes (or the worker releases) the claim's lease through the lease
    service: the saga is stale at once, the fence is refused with the lease's end, and the
    next claim takes over."""
    api = model_api
    await api.create("ended")
    old = await api.claim("ended", holder="w1")
    await api.step("ended", old.fence, 0, "plan", STARTED, compensation=comp("u"))
    if end == "revoke":
        await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=old.lease.lease_id))
        reason = "LEASE_REVOKED"
    else:
        await tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=old.lease.lease_id, fencing_token=old.lease.fencing_token, holder="w1"
            )
        )
        reason = "LEASE_RELEASED"
    saga = await api.get("ended")
    assert saga.stale
    assert saga.state == RUNNING
    before = saga.revision
    for call in (
        lambda: api.step("ended", old.fence, 1, "more"),
        lambda: api.heartbeat("ended", old.fence),
        lambda: api.complete("ended", old.fence),
        lambda: api.fail("ended", old.fence, reason="x"),
    ):
        refused = await outcome(call())
        assert isinstance(refused, Refusal)
        assert refused.key == (FP, reason), refused
    assert (await api.get("ended")).revision == before
    new = await api.claim("ended", holder="w2")
    assert new.saga.attempt == 2
    assert new.fence.fencing_token == old.fence.fencing_token + 1
    refused = await outcome(api.step("ended", old.fence, 1, "more"))
    assert isinstance(refused, Refusal)
    assert refused.key == E_STALE


async def test_a_handed_off_saga_is_claimed_by_a_compensation_worker(model_api: SagaApi) -> None:
    """FailSaga(hand_off) ends the claim and releases its lease: another worker claims the
    compensations at once with a lease of its own."""
    api = model_api
    await api.create("handoff")
    old = await api.claim("handoff", holder="w1")
    await api.step("handoff", old.fence, 0, "plan", STARTED, compensation=comp("u"))
    failed = await api.fail("handoff", old.fence, reason="boom", hand_off=True)
    assert failed.saga.state == COMPENSATING
    assert not failed.saga.HasField("claim")
    helper = await api.claim(kind="build", holder="w2", purpose=COMPENSATE)
    assert helper.saga.saga_id == "handoff"
    assert helper.fence.fencing_token == old.fence.fencing_token + 1
    refused = await outcome(api.compensate("handoff", old.fence, 0))
    assert isinstance(refused, Refusal)
    assert refused.key == E_STALE
    done = await api.compensate("handoff", helper.fence, 0)
    assert done.state == COMPENSATED


async def test_a_handed_off_saga_waits_without_reading_stale(model_api: SagaApi) -> None:
    """Stale means a claim whose lease ended; a saga handed off to a compensation worker
    has no claim: it is waiting, not stale."""
    api = model_api
    await api.create("unclaimed")
    fence = (await api.claim("unclaimed")).fence
    await api.step("unclaimed", fence, 0, "plan", STARTED, compensation=comp("u"))
    await api.fail("unclaimed", fence, reason="boom", hand_off=True)
    saga = await api.get("unclaimed")
    assert saga.state == COMPENSATING
    assert not saga.HasField("claim")
    assert not saga.stale


async def test_a_claim_under_the_callers_lease_leaves_it_alone(
    tether: Harness, model_api: SagaApi
) -> None:
    """A claim made with existing_lease uses the caller's fence; when the claim ends, the
    caller's lease stays live (only a lease created for the claim ends with it)."""
    api = model_api
    mine = await tether.acquire("workers/w1", "w1", ttl_s=30)
    fence = common_pb2.Fence(lease_id=mine.lease_id, fencing_token=mine.fencing_token)
    await api.create("own-1")
    await api.create("own-2")
    first = await api.claim("own-1", existing_lease=fence)
    second = await api.claim("own-2", existing_lease=fence)
    assert fence_of(first.fence) == fence_of(second.fence) == fence_of(fence)
    await api.step("own-1", fence, 0, "plan")
    done = await api.complete("own-1", fence)
    assert done.saga.state == COMPLETED
    assert (await tether.get(mine.lease_id)).state == lease_pb2.LEASE_STATE_ACTIVE
    # The other saga's claim goes on under the same lease.
    await api.step("own-2", fence, 0, "plan")
    await api.fail("own-2", fence, reason="again", retryable=True)
    assert (await tether.get(mine.lease_id)).state == lease_pb2.LEASE_STATE_ACTIVE
    # The lease's end is the claim's end: the saga reads stale at once.
    again = await api.claim("own-2", existing_lease=fence)
    assert again.saga.attempt == 2
    tether.clock.advance(30)
    assert (await api.get("own-2")).stale
    refused = await outcome(api.heartbeat("own-2", fence))
    assert isinstance(refused, Refusal)
    assert refused.key == E_EXPIRED


async def test_resume_is_refused_once_a_compensation_has_run(model_api: SagaApi) -> None:
    api = model_api
    await api.create("exhausted")
    fence = (await api.claim("exhausted")).fence
    await api.step("exhausted", fence, 0, "branch", STARTED, compensation=comp("unbranch", 1))
    await api.fail("exhausted", fence, reason="boom")
    refused = await api.compensate("exhausted", fence, 0, C_FAIL, error="cannot")
    assert refused.state == QUARANTINED
    assert refused.compensation.status == C_EXHAUSTED
    before = await api.get("exhausted")
    result = await outcome(api.redrive("exhausted", RESUME, "go on"))
    assert isinstance(result, Refusal), "RESUME accepted after the compensation ran"
    assert result.key == E_STATE
    assert (await api.get("exhausted")).revision == before.revision


async def test_a_compensating_saga_past_its_deadline_is_not_overdue(
    tether: Harness, model_api: SagaApi
) -> None:
    api = model_api
    deadline = tether.clock.now_us() + 60 * S
    await api.create("late", deadline=timestamp_pb2.Timestamp(seconds=deadline // S))
    fence = (await api.claim("late")).fence
    await api.step("late", fence, 0, "plan", STARTED, compensation=comp("u"))
    await api.fail("late", fence, reason="boom")
    tether.clock.advance(61)
    saga = await api.get("late")
    # Overdue is a PLANNED or RUNNING saga not yet sent to compensation; compensations
    # run to the end whatever the deadline.
    assert saga.state == COMPENSATING
    assert not saga.overdue


async def test_claims_never_take_an_overdue_saga(tether: Harness, model_api: SagaApi) -> None:
    """Before the deadline task runs, a claim settles an overdue saga first: it moves to
    compensation (or FAILED) and is never handed out for execution."""
    api = model_api
    now = tether.clock.now_us()
    deadline = timestamp_pb2.Timestamp(seconds=(now + 60 * S) // S)
    await api.create("late-plain", "late", deadline=deadline)
    await api.create("late-run", "late", deadline=deadline)
    fence = (await api.claim("late-run", holder="w1", ttl_s=600)).fence
    await api.step("late-run", fence, 0, "plan", STARTED, compensation=comp("unplan"))
    tether.clock.advance(60)  # exactly the deadline
    overdue = await api.list_all(kind="late", overdue_only=True)
    assert {s.saga_id for s in overdue} == {"late-plain", "late-run"}
    refused = await outcome(api.heartbeat("late-run", fence))
    assert isinstance(refused, Refusal)
    assert refused.key == E_STATE
    assert refused.metadata["state"] == "SAGA_STATE_RUNNING"
    nothing = await outcome(api.claim(kind="late", holder="w2"))
    assert isinstance(nothing, Refusal)
    assert nothing.key == E_NOTHING
    plain = await api.get("late-plain")
    assert plain.state == FAILED
    assert "deadline" in plain.failure_reason
    # The running saga's claim ended with its deadline: a compensation worker takes it.
    helper = await api.claim(kind="late", holder="w2", purpose=COMPENSATE)
    assert helper.saga.saga_id == "late-run"
    assert helper.saga.state == COMPENSATING
    assert not helper.saga.overdue
    refused = await outcome(api.step("late-run", fence, 1, "more"))
    assert isinstance(refused, Refusal)
    assert refused.key == E_STALE
    assert (await api.compensate("late-run", helper.fence, 0)).state == COMPENSATED
