"""Lease transactions. Each public method is one transaction.

Lock order, on every path: the key row (``lease_keys``), then lease rows, then the
revision counter last. The expiry loop touches only lease rows and the counter, so no two
paths can wait on each other in a cycle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, and_, bindparam, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tether_server.domain import errors
from tether_server.domain.lease import (
    ANONYMOUS,
    AcquireIntent,
    AlreadyEnded,
    EndNow,
    ExpireFirst,
    Grant,
    Lease,
    LeaseEventType,
    LeaseKey,
    LeaseState,
    Refuse,
    ReturnExisting,
    decide_acquire,
    decide_release,
    decide_revoke,
    lock_delay_after_end,
    not_found,
    renewal_refusal,
)
from tether_server.store.database import Database, Tx
from tether_server.store.schema import (
    lease_events,
    lease_keys,
    lease_requests,
    leases,
    revisions,
)


@dataclass(frozen=True)
class AcquireParams:
    namespace: str
    key: str
    holder: str
    principal: str
    ttl_us: int
    lock_delay_us: int = 0
    labels: Mapping[str, str] | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class AcquireResult:
    lease: Lease
    created: bool


@dataclass(frozen=True)
class Renewal:
    lease_id: str
    fencing_token: int
    progress: bytes | None = None
    # Only the principal that acquired the lease may renew it.
    principal: str = ANONYMOUS


@dataclass(frozen=True)
class Renewed:
    lease_id: str
    fencing_token: int
    expires_at_us: int
    # Remaining ttl at the moment of renewal: the full ttl.
    ttl_us: int


@dataclass(frozen=True)
class ReleaseParams:
    namespace: str
    lease_id: str
    fencing_token: int
    holder: str
    principal: str = ANONYMOUS


@dataclass(frozen=True)
class RevokeParams:
    namespace: str
    lease_id: str


@dataclass(frozen=True)
class ListLeasesParams:
    namespace: str
    key_prefix: str = ""
    holder: str = ""
    states: frozenset[LeaseState] = frozenset()
    limit: int = 100
    # (key, fencing_token) of the last item of the previous page.
    after: tuple[str, int] | None = None


@dataclass(frozen=True)
class LeaseEventRecord:
    revision: int
    type: LeaseEventType
    lease: Lease
    occurred_at_us: int


@dataclass(frozen=True)
class EventPage:
    events: list[LeaseEventRecord]
    header_revision: int
    compact_revision: int


@dataclass(frozen=True)
class ExpiryResult:
    expired: list[Lease]
    # Earliest deadline of a lease still active after this pass, if any, and the store's
    # `now` for this pass: sleep for the difference, so clock skew between a replica and
    # the database does not matter.
    next_deadline_us: int | None
    now_us: int


def new_lease_id() -> str:
    return secrets.token_hex(16)


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- writes ---------------------------------------------------------------------

    async def lease_acquire(self, p: AcquireParams) -> AcquireResult | Refuse:
        async def work(tx: Tx) -> AcquireResult | Refuse:
            if p.request_id is not None:
                first = await self._first_result(tx, p)
                if first is not None:
                    return AcquireResult(_effective(first, tx.now_us), created=False)
            key = await self._lock_key(tx, p.namespace, p.key)
            # Lock the current lease row too: renewals take only that lock, and the decision
            # must see a renewal that committed after the key lock was granted.
            current = (
                await self._get(tx, key.current_lease_id, for_update=True)
                if key.current_lease_id
                else None
            )
            await tx.refresh_now()
            decision = decide_acquire(key, current, AcquireIntent(p.holder, p.principal), tx.now_us)
            if isinstance(decision, ReturnExisting):
                await self._remember_result(tx, p, decision.lease)
                return AcquireResult(decision.lease, created=False)
            stale = decision.expire_current
            if stale is not None:
                await self._end(tx, [stale], LeaseState.EXPIRED)
            if isinstance(decision, Refuse):
                # Nothing was granted: a retry with the same request id may still succeed.
                return decision
            granted = await self._grant(tx, key, p, decision)
            await self._remember_result(tx, p, granted)
            return AcquireResult(granted, created=True)

        return await self.db.run_write(work)

    async def lease_renew_many(
        self, namespace: str, renewals: Sequence[Renewal], stream_id: str | None = None
    ) -> list[Renewed | errors.TetherError]:
        """Renew many leases in one transaction; one outcome per renewal, in order."""
        if not renewals:
            return []

        async def work(tx: Tx) -> list[Renewed | errors.TetherError]:
            ids = sorted({r.lease_id for r in renewals})
            if not self.db.is_sqlite:
                # Lock in one global order (no deadlock between batches), then read the
                # clock: a renewal that waited on a lock past the deadline must fail.
                for chunk in _chunks(ids):
                    await tx.conn.execute(
                        select(leases.c.lease_id)
                        .where(leases.c.lease_id.in_(chunk))
                        .order_by(leases.c.lease_id)
                        .with_for_update()
                    )
            now = await tx.refresh_now()
            triples = sorted({(r.lease_id, r.fencing_token, r.principal) for r in renewals})
            values: dict[str, Any] = {
                # Never backwards: a renewal whose transaction started earlier but commits
                # later must not shorten a deadline a newer renewal already reported.
                "renewed_at_us": self._greatest(leases.c.renewed_at_us, now),
                "expires_at_us": self._greatest(leases.c.expires_at_us, now + leases.c.ttl_us),
            }
            if stream_id is not None:
                values["stream_id"] = stream_id
            renewed: dict[str, Row[Any]] = {}
            # Chunked: one statement with thousands of row values exhausts PostgreSQL's
            # expression stack.
            for batch in _chunks(triples):
                # Conditional: a lease at or past its deadline is never renewed, whatever
                # the expiry loop has or has not recorded yet.
                result = await tx.conn.execute(
                    update(leases)
                    .where(
                        tuple_(leases.c.lease_id, leases.c.fencing_token, leases.c.principal).in_(
                            batch
                        ),
                        leases.c.namespace == namespace,
                        leases.c.state == LeaseState.ACTIVE.value,
                        leases.c.expires_at_us > now,
                    )
                    .values(**values)
                    .returning(
                        leases.c.lease_id,
                        leases.c.fencing_token,
                        leases.c.principal,
                        leases.c.expires_at_us,
                        leases.c.ttl_us,
                    )
                )
                renewed.update({row.lease_id: row for row in result})
            # Only a renewal that itself succeeded (its token is the current one) may store
            # progress: a stale entry in the same batch must not overwrite the holder's.
            progress = {
                r.lease_id: r.progress
                for r in renewals
                if r.progress is not None
                and r.lease_id in renewed
                and renewed[r.lease_id].fencing_token == r.fencing_token
                and renewed[r.lease_id].principal == r.principal
            }
            for lease_id, details in progress.items():
                await tx.conn.execute(
                    update(leases).where(leases.c.lease_id == lease_id).values(progress=details)
                )
            missing = {r.lease_id for r in renewals if r.lease_id not in renewed}
            known = {lease.lease_id: lease for lease in await self._get_many(tx, missing)}
            outcomes: list[Renewed | errors.TetherError] = []
            for r in renewals:
                row = renewed.get(r.lease_id)
                # A batch may name one lease twice with different tokens: only the current
                # token's renewal succeeded.
                if (
                    row is not None
                    and row.fencing_token == r.fencing_token
                    and row.principal == r.principal
                ):
                    outcomes.append(
                        Renewed(r.lease_id, r.fencing_token, row.expires_at_us, row.ttl_us)
                    )
                else:
                    lease = known.get(r.lease_id)
                    if lease is None and row is not None:
                        lease = await self._get(tx, r.lease_id)
                    outcomes.append(
                        renewal_refusal(
                            lease, r.lease_id, namespace, r.fencing_token, r.principal, now
                        )
                    )
            return outcomes

        return await self.db.run_write(work)

    async def lease_renew(self, namespace: str, renewal: Renewal) -> Renewed:
        (outcome,) = await self.lease_renew_many(namespace, [renewal])
        if isinstance(outcome, errors.TetherError):
            raise outcome
        return outcome

    async def lease_release(self, p: ReleaseParams) -> Lease:
        async def work(tx: Tx) -> Lease:
            lease, key = await self._lock_lease_and_key(tx, p.namespace, p.lease_id)
            decision = decide_release(
                lease, p.lease_id, p.namespace, p.fencing_token, p.holder, p.principal, tx.now_us
            )
            assert lease is not None
            assert key is not None
            return await self._apply_end(tx, lease, key, decision)

        return await self.db.run_write(work)

    async def lease_revoke(self, p: RevokeParams) -> Lease:
        async def work(tx: Tx) -> Lease:
            lease, key = await self._lock_lease_and_key(tx, p.namespace, p.lease_id)
            decision = decide_revoke(lease, p.lease_id, p.namespace, tx.now_us)
            assert lease is not None
            assert key is not None
            return await self._apply_end(tx, lease, key, decision)

        return await self.db.run_write(work)

    async def lease_expire_due(self, limit: int = 500) -> ExpiryResult:
        """Record the expiry of up to ``limit`` leases whose deadline has passed."""

        async def work(tx: Tx) -> ExpiryResult:
            due_query = (
                select(leases)
                .where(
                    leases.c.state == LeaseState.ACTIVE.value,
                    leases.c.expires_at_us <= tx.now_us,
                )
                .order_by(leases.c.expires_at_us)
                .limit(limit)
            )
            if not self.db.is_sqlite:
                # Replicas expiring at once split the work instead of queueing on rows.
                due_query = due_query.with_for_update(skip_locked=True)
            due = [_row_to_lease(row) for row in await tx.conn.execute(due_query)]
            expired = await self._end(tx, due, LeaseState.EXPIRED)
            return ExpiryResult(expired, await self._next_deadline(tx), tx.now_us)

        return await self.db.run_write(work)

    async def lease_detach_stream(self, stream_id: str) -> int:
        """A KeepAlive stream closed: its leases no longer have a live stream attached."""

        async def work(tx: Tx) -> int:
            result = await tx.conn.execute(
                update(leases).where(leases.c.stream_id == stream_id).values(stream_id=None)
            )
            return int(result.rowcount)

        return await self.db.run_write(work)

    async def lease_detach_all_streams(self) -> int:
        """At start of a single-process store: no stream of a previous process is open."""

        async def work(tx: Tx) -> int:
            result = await tx.conn.execute(
                update(leases).where(leases.c.stream_id.is_not(None)).values(stream_id=None)
            )
            return int(result.rowcount)

        return await self.db.run_write(work)

    async def lease_events_compact(self, up_to_revision: int) -> int:
        """Purge events at or below a revision; watchers asking for them get OUT_OF_RANGE."""

        async def work(tx: Tx) -> int:
            current = (
                await tx.conn.execute(select(revisions.c.current).with_for_update())
            ).scalar_one()
            # Never past the head: revisions not handed out yet cannot have been purged.
            target = min(up_to_revision, int(current))
            result = await tx.conn.execute(
                lease_events.delete().where(lease_events.c.revision <= target)
            )
            await tx.conn.execute(
                update(revisions)
                .where(revisions.c.id == 1, revisions.c.compacted < target)
                .values(compacted=target)
            )
            return int(result.rowcount)

        return await self.db.run_write(work)

    # ---- reads ----------------------------------------------------------------------

    async def lease_get(self, namespace: str, lease_id: str) -> Lease:
        async with self.db.read() as tx:
            lease = await self._get(tx, lease_id)
            if lease is None or lease.namespace != namespace:
                raise not_found(lease_id, namespace)
            return _effective(lease, tx.now_us)

    async def lease_get_by_key(self, namespace: str, key: str) -> Lease:
        async with self.db.read() as tx:
            row = (
                await tx.conn.execute(
                    select(leases)
                    .where(leases.c.namespace == namespace, leases.c.key == key)
                    .order_by(leases.c.fencing_token.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                raise errors.LeaseNotFound(
                    f"no lease for key {key!r} in namespace {namespace!r}",
                    {"key": key, "namespace": namespace},
                )
            return _effective(_row_to_lease(row), tx.now_us)

    async def lease_list(self, p: ListLeasesParams) -> list[Lease]:
        async with self.db.read() as tx:
            conditions: list[ColumnElement[bool]] = [leases.c.namespace == p.namespace]
            if p.key_prefix:
                conditions.append(_has_prefix(leases.c.key, p.key_prefix))
            if p.holder:
                conditions.append(leases.c.holder == p.holder)
            if p.states:
                conditions.append(or_(*(_in_state(s, tx.now_us) for s in p.states)))
            if p.after is not None:
                conditions.append(tuple_(leases.c.key, leases.c.fencing_token) > tuple_(*p.after))
            rows = await tx.conn.execute(
                select(leases)
                .where(*conditions)
                .order_by(leases.c.key, leases.c.fencing_token)
                .limit(p.limit)
            )
            return [_effective(_row_to_lease(row), tx.now_us) for row in rows]

    async def lease_events_since(
        self, namespace: str, key_prefix: str, start_revision: int, limit: int = 500
    ) -> EventPage:
        """Events with revision >= start_revision under the prefix, oldest first."""
        async with self.db.read() as tx:
            header = (
                await tx.conn.execute(select(revisions.c.current, revisions.c.compacted))
            ).one()
            if 0 < start_revision <= header.compacted:
                raise errors.RevisionCompacted(
                    f"revision {start_revision} was purged; the oldest available is "
                    f"{header.compacted + 1}",
                    {
                        "compact_revision": str(header.compacted),
                        "requested_revision": str(start_revision),
                    },
                )
            conditions: list[ColumnElement[bool]] = [
                lease_events.c.namespace == namespace,
                lease_events.c.revision >= start_revision,
            ]
            if key_prefix:
                conditions.append(_has_prefix(lease_events.c.key, key_prefix))
            rows = await tx.conn.execute(
                select(lease_events)
                .where(*conditions)
                .order_by(lease_events.c.revision)
                .limit(limit)
            )
            events = [
                LeaseEventRecord(
                    revision=row.revision,
                    type=LeaseEventType(row.type),
                    lease=_lease_from_json(row.snapshot),
                    occurred_at_us=row.occurred_at_us,
                )
                for row in rows
            ]
            return EventPage(events, int(header.current), int(header.compacted))

    async def lease_next_deadline(self) -> int | None:
        async with self.db.read() as tx:
            return await self._next_deadline(tx)

    # ---- pieces ---------------------------------------------------------------------

    def _greatest(self, column: Any, value: Any) -> Any:
        # SQLite's scalar max() is PostgreSQL's greatest().
        return func.max(column, value) if self.db.is_sqlite else func.greatest(column, value)

    async def _lock_key(self, tx: Tx, namespace: str, key: str) -> LeaseKey:
        insert = pg_insert if not self.db.is_sqlite else sqlite_insert
        await tx.conn.execute(
            insert(lease_keys)
            .values(
                namespace=namespace,
                key=key,
                last_fencing_token=0,
                available_at_us=0,
                current_lease_id=None,
            )
            .on_conflict_do_nothing(index_elements=["namespace", "key"])
        )
        row = (
            await tx.conn.execute(
                select(lease_keys)
                .where(lease_keys.c.namespace == namespace, lease_keys.c.key == key)
                .with_for_update()
            )
        ).one()
        return LeaseKey(
            namespace=row.namespace,
            key=row.key,
            last_fencing_token=row.last_fencing_token,
            available_at_us=row.available_at_us,
            current_lease_id=row.current_lease_id,
        )

    async def _lock_lease_and_key(
        self, tx: Tx, namespace: str, lease_id: str
    ) -> tuple[Lease | None, LeaseKey | None]:
        """Lock the lease's key row, then read the lease under that lock."""
        unlocked = await self._get(tx, lease_id)
        if unlocked is None or unlocked.namespace != namespace:
            return unlocked, None
        key = await self._lock_key(tx, unlocked.namespace, unlocked.key)
        # The lease row lock orders this against renewals and the expiry loop, which do not
        # take the key lock.
        lease = await self._get(tx, lease_id, for_update=True)
        await tx.refresh_now()
        return lease, key

    async def _grant(self, tx: Tx, key: LeaseKey, p: AcquireParams, grant: Grant) -> Lease:
        now = tx.now_us
        revision = await tx.next_revisions(1)
        lease = Lease(
            lease_id=new_lease_id(),
            namespace=p.namespace,
            key=p.key,
            holder=p.holder,
            principal=p.principal,
            ttl_us=p.ttl_us,
            fencing_token=grant.fencing_token,
            state=LeaseState.ACTIVE,
            acquired_at_us=now,
            renewed_at_us=now,
            expires_at_us=now + p.ttl_us,
            lock_delay_us=p.lock_delay_us,
            labels=dict(p.labels or {}),
            request_id=p.request_id,
            create_revision=revision,
            mod_revision=revision,
        )
        await tx.conn.execute(leases.insert().values(**_lease_to_row(lease)))
        await tx.conn.execute(
            update(lease_keys)
            .where(lease_keys.c.namespace == key.namespace, lease_keys.c.key == key.key)
            .values(last_fencing_token=grant.fencing_token, current_lease_id=lease.lease_id)
        )
        await self._record_events(tx, [(revision, LeaseEventType.ACQUIRED, lease)])
        return lease

    async def _apply_end(
        self, tx: Tx, lease: Lease, key: LeaseKey, decision: EndNow | ExpireFirst | AlreadyEnded
    ) -> Lease:
        if isinstance(decision, AlreadyEnded):
            return _effective(lease, tx.now_us)
        state = decision.state if isinstance(decision, EndNow) else LeaseState.EXPIRED
        ended_now = await self._end(tx, [lease], state)
        if not ended_now:
            # Impossible while the row is locked; kept as a guard so a future path that
            # forgets the lock degrades to "already ended", not to an exception.
            latest = await self._get(tx, lease.lease_id)
            assert latest is not None
            return _effective(latest, tx.now_us)
        (ended,) = ended_now
        # Expiry's lock-delay is derived from the lease itself (see decide_acquire).
        available_at = lock_delay_after_end(lease, state, tx.now_us)
        if state is LeaseState.REVOKED and available_at > key.available_at_us:
            await tx.conn.execute(
                update(lease_keys)
                .where(lease_keys.c.namespace == key.namespace, lease_keys.c.key == key.key)
                .values(available_at_us=available_at)
            )
        return ended

    async def _end(self, tx: Tx, candidates: Sequence[Lease], state: LeaseState) -> list[Lease]:
        """End active leases with ``state`` and record one event each.

        Conditional on the row still being ACTIVE, so a lease is ended (and its event
        written) exactly once however many paths race to end it.
        """
        if not candidates:
            return []
        now = tx.now_us
        by_id = {lease.lease_id: lease for lease in candidates}
        conditions = [
            leases.c.lease_id.in_(list(by_id)),
            leases.c.state == LeaseState.ACTIVE.value,
        ]
        ended_at: Any = now
        if state is LeaseState.EXPIRED:
            # Re-checked on the latest row version: a renewal that committed meanwhile wins.
            conditions.append(leases.c.expires_at_us <= now)
            # An expiry happened at the deadline, whenever it is recorded.
            ended_at = leases.c.expires_at_us
        result = await tx.conn.execute(
            update(leases)
            .where(*conditions)
            .values(state=state.value, ended_at_us=ended_at, stream_id=None)
            .returning(leases.c.lease_id, leases.c.ended_at_us)
        )
        ended_rows = sorted(result, key=lambda row: (by_id[row.lease_id].expires_at_us, row[0]))
        if not ended_rows:
            return []
        first = await tx.next_revisions(len(ended_rows))
        ended: list[Lease] = []
        for offset, row in enumerate(ended_rows):
            ended.append(
                replace(
                    by_id[row.lease_id],
                    state=state,
                    ended_at_us=row.ended_at_us,
                    stream_attached=False,
                    mod_revision=first + offset,
                )
            )
        # One executemany round trip, not one statement per lease (expiry ends hundreds).
        await tx.conn.execute(
            update(leases)
            .where(leases.c.lease_id == bindparam("b_lease_id"))
            .values(mod_revision=bindparam("b_mod_revision")),
            [{"b_lease_id": x.lease_id, "b_mod_revision": x.mod_revision} for x in ended],
        )
        event_type = LeaseEventType(state.value)
        await self._record_events(tx, [(lease.mod_revision, event_type, lease) for lease in ended])
        return ended

    async def _record_events(
        self, tx: Tx, events: Sequence[tuple[int, LeaseEventType, Lease]]
    ) -> None:
        tx.wrote_events = True
        await tx.conn.execute(
            lease_events.insert(),
            [
                {
                    "revision": revision,
                    "namespace": lease.namespace,
                    "key": lease.key,
                    "lease_id": lease.lease_id,
                    "type": event_type.value,
                    "occurred_at_us": tx.now_us,
                    "snapshot": _lease_to_json(lease),
                }
                for revision, event_type, lease in events
            ],
        )

    async def _get(self, tx: Tx, lease_id: str, *, for_update: bool = False) -> Lease | None:
        query = select(leases).where(leases.c.lease_id == lease_id)
        if for_update:
            query = query.with_for_update()
        row = (await tx.conn.execute(query)).first()
        return _row_to_lease(row) if row is not None else None

    async def _get_many(self, tx: Tx, lease_ids: set[str]) -> list[Lease]:
        found: list[Lease] = []
        for chunk in _chunks(sorted(lease_ids)):
            rows = await tx.conn.execute(select(leases).where(leases.c.lease_id.in_(chunk)))
            found.extend(_row_to_lease(row) for row in rows)
        return found

    async def _first_result(self, tx: Tx, p: AcquireParams) -> Lease | None:
        """The lease a request id was first answered with, or None for a new request id."""
        assert p.request_id is not None
        row = (
            await tx.conn.execute(
                select(lease_requests).where(
                    lease_requests.c.namespace == p.namespace,
                    lease_requests.c.request_id == p.request_id,
                )
            )
        ).first()
        if row is None:
            return None
        if row.fingerprint != _fingerprint(p):
            raise errors.RequestIdConflict(
                f"request_id {p.request_id!r} was first used for a different acquire",
                {"request_id": p.request_id, "lease_id": row.lease_id},
            )
        return await self._get(tx, row.lease_id)

    async def _remember_result(self, tx: Tx, p: AcquireParams, lease: Lease) -> None:
        if p.request_id is None:
            return
        # Two first attempts racing insert the same key: the loser's transaction is retried
        # (Database._guard) and then finds the winner's record.
        await tx.conn.execute(
            lease_requests.insert().values(
                namespace=p.namespace,
                request_id=p.request_id,
                lease_id=lease.lease_id,
                fingerprint=_fingerprint(p),
                created_at_us=tx.now_us,
            )
        )

    async def _next_deadline(self, tx: Tx) -> int | None:
        value = (
            await tx.conn.execute(
                select(func.min(leases.c.expires_at_us)).where(
                    leases.c.state == LeaseState.ACTIVE.value
                )
            )
        ).scalar_one_or_none()
        return int(value) if value is not None else None


_CHUNK = 500
_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> list[Sequence[_T]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _fingerprint(p: AcquireParams) -> str:
    """What makes two acquires with one request id the same request."""
    content = [
        p.key,
        p.holder,
        p.principal,
        p.ttl_us,
        p.lock_delay_us,
        sorted((p.labels or {}).items()),
    ]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _has_prefix(column: Any, prefix: str) -> ColumnElement[bool]:
    # substr, not LIKE: SQLite's LIKE ignores ASCII case and both need escaping.
    return func.substr(column, 1, len(prefix)) == prefix


def _in_state(state: LeaseState, now_us: int) -> ColumnElement[bool]:
    """The SQL form of Lease.effective_state(now) == state."""
    active = leases.c.state == LeaseState.ACTIVE.value
    if state is LeaseState.ACTIVE:
        return and_(active, leases.c.expires_at_us > now_us)
    if state is LeaseState.EXPIRED:
        return or_(
            leases.c.state == LeaseState.EXPIRED.value,
            and_(active, leases.c.expires_at_us <= now_us),
        )
    return leases.c.state == state.value


def _effective(lease: Lease, now_us: int) -> Lease:
    state = lease.effective_state(now_us)
    if state is lease.state:
        return lease
    return replace(lease, state=state, ended_at_us=lease.expires_at_us, stream_attached=False)


def _row_to_lease(row: Row[Any]) -> Lease:
    return Lease(
        lease_id=row.lease_id,
        namespace=row.namespace,
        key=row.key,
        holder=row.holder,
        principal=row.principal,
        ttl_us=row.ttl_us,
        fencing_token=row.fencing_token,
        state=LeaseState(row.state),
        acquired_at_us=row.acquired_at_us,
        renewed_at_us=row.renewed_at_us,
        expires_at_us=row.expires_at_us,
        ended_at_us=row.ended_at_us,
        lock_delay_us=row.lock_delay_us,
        labels=json.loads(row.labels),
        progress=bytes(row.progress),
        stream_attached=row.stream_id is not None,
        request_id=row.request_id,
        create_revision=row.create_revision,
        mod_revision=row.mod_revision,
    )


def _lease_to_row(lease: Lease) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "namespace": lease.namespace,
        "key": lease.key,
        "holder": lease.holder,
        "principal": lease.principal,
        "ttl_us": lease.ttl_us,
        "fencing_token": lease.fencing_token,
        "state": lease.state.value,
        "acquired_at_us": lease.acquired_at_us,
        "renewed_at_us": lease.renewed_at_us,
        "expires_at_us": lease.expires_at_us,
        "ended_at_us": lease.ended_at_us,
        "lock_delay_us": lease.lock_delay_us,
        "labels": json.dumps(dict(lease.labels), sort_keys=True),
        "progress": lease.progress,
        "stream_id": None,
        "request_id": lease.request_id,
        "create_revision": lease.create_revision,
        "mod_revision": lease.mod_revision,
    }


def _lease_to_json(lease: Lease) -> str:
    row = _lease_to_row(lease)
    row["labels"] = dict(lease.labels)
    row["progress"] = base64.b64encode(lease.progress).decode()
    del row["stream_id"]
    return json.dumps(row, sort_keys=True)


def _lease_from_json(text: str) -> Lease:
    data = json.loads(text)
    data["state"] = LeaseState(data["state"])
    data["progress"] = base64.b64decode(data["progress"])
    return Lease(**data)
