"""The background Runner on a fake clock: no database and no real sleeps.

Tests learn that a task is asleep from the clock itself (StepClock records every sleep
request), then advance time. Negative checks ("did not run") let the event loop settle
first and are always paired with a positive signal that time was processed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from tests.support.step_clock import StepClock
from tether_server.clock import MICROS, FakeClock
from tether_server.runtime import AlwaysLeader, Runner, TaskSpec

# Only a bound against hangs; no assertion here depends on how fast anything runs.
SAFETY_S = 5.0


class Pass:
    """A task pass that records when it ran (in clock time) and can be awaited."""

    def __init__(
        self,
        clock: FakeClock,
        results: Callable[[int], float | None] = lambda n: None,
        fail: Callable[[int], bool] = lambda n: False,
    ) -> None:
        self._clock = clock
        self._results = results
        self._fail = fail
        self.times: list[int] = []
        self._ran = asyncio.Event()

    async def __call__(self) -> float | None:
        n = len(self.times) + 1
        self.times.append(self._clock.now_us())
        self._ran.set()
        self._ran = asyncio.Event()
        if self._fail(n):
            raise RuntimeError(f"pass {n} failed")
        return self._results(n)

    @property
    def count(self) -> int:
        return len(self.times)

    async def reached(self, count: int) -> None:
        async with asyncio.timeout(SAFETY_S):
            while self.count < count:
                await self._ran.wait()


class FlipLeader:
    """A Leadership a test grants and revokes by hand."""

    def __init__(self) -> None:
        self._leader = False
        self._event = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader

    def set(self, leader: bool) -> None:
        self._leader = leader
        if leader:
            self._event.set()
        else:
            self._event.clear()

    async def wait_leader(self) -> None:
        await self._event.wait()

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def settle() -> None:
    """Let every ready callback run (for negative checks only)."""
    for _ in range(50):
        await asyncio.sleep(0)


Run = Callable[[], Awaitable[float | None]]


def spec(name: str, run: Run, interval_s: float = 10.0, **kwargs: object) -> TaskSpec:
    return TaskSpec(name=name, run=run, interval_s=interval_s, **kwargs)  # type: ignore[arg-type]


async def test_task_runs_at_its_interval() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    tick = Pass(clock)
    runner.add(spec("tick", tick, interval_s=5.0))
    start = clock.now_us()
    runner.start()
    try:
        await tick.reached(1)
        for n in range(1, 4):
            assert await clock.asleep(n) == 5.0
            clock.advance(4.999)
            await settle()
            assert tick.count == n
            clock.advance(0.001)
            await tick.reached(n + 1)
        assert [t - start for t in tick.times] == [0, 5 * MICROS, 10 * MICROS, 15 * MICROS]
    finally:
        await runner.stop()


async def test_returned_seconds_schedule_the_next_pass() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    # 2 s, then "its interval", then 0.5 s, then the interval again.
    plan: dict[int, float | None] = {1: 2.0, 2: None, 3: 0.5}
    task = Pass(clock, results=lambda n: plan.get(n))
    runner.add(spec("sched", task, interval_s=30.0))
    runner.start()
    try:
        for n, expected in enumerate([2.0, 30.0, 0.5, 30.0], start=1):
            assert await clock.asleep(n) == expected
            assert task.count == n
            clock.advance(expected)
            await task.reached(n + 1)
    finally:
        await runner.stop()


async def test_backlog_runs_again_without_sleeping() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    # Passes 1-3 report a backlog (0, and a negative value counts too); pass 4 is done.
    plan: dict[int, float | None] = {1: 0.0, 2: 0.0, 3: -1.0}
    task = Pass(clock, results=lambda n: plan.get(n))
    runner.add(spec("backlog", task, interval_s=7.0))
    runner.start()
    try:
        assert await clock.asleep(1) == 7.0
        assert task.count == 4
        assert len(set(task.times)) == 1  # no time passed between them
    finally:
        await runner.stop()


async def test_wake_runs_a_sleeping_task_now() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    task = Pass(clock)
    runner.add(spec("expiry", task, interval_s=60.0))
    runner.start()
    try:
        await clock.asleep(1)
        runner.wake("expiry")
        await task.reached(2)
        assert task.times[1] == task.times[0]
        # Back to the normal timer afterwards.
        assert await clock.asleep(2) == 60.0
    finally:
        await runner.stop()


async def test_wake_during_a_pass_runs_again_after_it() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    entered = asyncio.Event()
    release = asyncio.Event()
    count = 0

    async def blocking() -> None:
        nonlocal count
        count += 1
        if count == 1:
            entered.set()
            await release.wait()

    runner.add(spec("expiry", blocking, interval_s=60.0))
    runner.start()
    try:
        async with asyncio.timeout(SAFETY_S):
            await entered.wait()
        runner.wake("expiry")
        release.set()
        # The second pass runs without any time passing and without a sleep in between.
        assert await clock.asleep(1) == 60.0
        assert count == 2
    finally:
        await runner.stop()


async def test_failures_back_off_then_reset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether_server.runtime.runner")
    clock = StepClock()
    reports: list[tuple[str, bool, float]] = []
    runner = Runner(clock, AlwaysLeader(), on_run=lambda *r: reports.append(r))
    # Passes 1-5 fail, 6 succeeds, 7 fails again.
    task = Pass(clock, fail=lambda n: n <= 5 or n == 7)
    runner.add(
        spec("flaky", task, interval_s=100.0, backoff_initial_s=1.0, backoff_max_s=8.0),
    )
    runner.start()
    try:
        for n in range(1, 8):
            delay = await clock.asleep(n)
            clock.advance(delay)
            await task.reached(n + 1)
        assert await clock.asleep(8) == 100.0  # pass 8 succeeded
    finally:
        await runner.stop()

    first, second, third, fourth, fifth, after_success, after_new_failure = clock.sleeps[:7]
    assert first == 1.0  # the upper-half jitter of 1 s never goes below the initial 1 s
    assert 1.0 <= second <= 2.0
    assert 2.0 <= third <= 4.0
    assert 4.0 <= fourth <= 8.0
    assert 4.0 <= fifth <= 8.0  # capped
    assert after_success == 100.0
    assert after_new_failure == 1.0  # the streak was reset by the success

    assert [(name, ok) for name, ok, _ in reports[:7]] == [
        ("flaky", False),
        ("flaky", False),
        ("flaky", False),
        ("flaky", False),
        ("flaky", False),
        ("flaky", True),
        ("flaky", False),
    ]
    assert all(seconds >= 0 for _, _, seconds in reports)

    failed = [r for r in caplog.records if r.getMessage() == "background task failed"]
    assert len(failed) == 6  # one record per failed pass, with its traceback
    assert all(r.exc_info is not None and getattr(r, "task", None) == "flaky" for r in failed)
    recovered = [r for r in caplog.records if r.getMessage() == "background task recovered"]
    assert [getattr(r, "failures", None) for r in recovered] == [5, 1]


def test_backoff_bounds() -> None:
    s = spec("x", Pass(FakeClock()), backoff_initial_s=0.1, backoff_max_s=10.0)
    assert s.backoff_s(1, rand=lambda: 0.0) == 0.1
    assert s.backoff_s(3, rand=lambda: 0.0) == pytest.approx(0.2)
    assert s.backoff_s(3, rand=lambda: 1.0) == pytest.approx(0.4)
    assert s.backoff_s(10_000, rand=lambda: 1.0) == 10.0  # no overflow after a long outage
    assert s.backoff_s(10_000, rand=lambda: 0.0) == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval_s": 0},
        {"interval_s": float("nan")},
        {"backoff_initial_s": -1},
        {"backoff_initial_s": 2.0, "backoff_max_s": 1.0},
        {"name": ""},
    ],
)
def test_spec_validation(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "x", "run": Pass(FakeClock()), "interval_s": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        TaskSpec(**args)  # type: ignore[arg-type]


async def test_stop_waits_for_the_pass_in_flight() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    entered = asyncio.Event()
    release = asyncio.Event()
    outcome: list[str] = []

    async def slow() -> None:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("finished")

    runner.add(spec("slow", slow))
    runner.start()
    async with asyncio.timeout(SAFETY_S):
        await entered.wait()
    stopping = asyncio.create_task(runner.stop())
    await settle()
    assert not stopping.done()
    assert outcome == []
    release.set()
    async with asyncio.timeout(SAFETY_S):
        await stopping
    assert outcome == ["finished"]
    assert clock.sleeps == []  # stopped after the pass, not put to sleep again


async def test_start_and_stop_twice_are_safe() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    await runner.stop()  # never started
    task = Pass(clock)
    runner.add(spec("t", task))
    runner.start()
    runner.start()
    await clock.asleep(1)
    await settle()
    assert task.count == 1  # one asyncio task, not two
    await runner.stop()
    await runner.stop()
    # Stopped means stopped: time passing runs nothing.
    clock.advance(100)
    await settle()
    assert task.count == 1
    # And it can be started again.
    runner.start()
    await task.reached(2)
    await runner.stop()


async def test_add_after_start_starts_the_task() -> None:
    clock = StepClock()
    runner = Runner(clock, AlwaysLeader())
    runner.start()
    try:
        task = Pass(clock)
        runner.add(spec("late", task))
        await task.reached(1)
        with pytest.raises(ValueError, match="already registered"):
            runner.add(spec("late", task))
    finally:
        await runner.stop()


async def test_leader_only_task_waits_for_leadership() -> None:
    clock = StepClock()
    leader = FlipLeader()
    runner = Runner(clock, leader)
    everywhere = Pass(clock)
    leader_only = Pass(clock)
    runner.add(spec("everywhere", everywhere, interval_s=5.0))
    runner.add(spec("reap", leader_only, interval_s=5.0, leader_only=True))
    runner.start()
    try:
        await everywhere.reached(1)
        await clock.asleep(1)
        await settle()
        assert leader_only.count == 0

        leader.set(True)
        await leader_only.reached(1)  # at once, no time passed
        assert leader_only.times[0] == everywhere.times[0]
        await clock.asleep(2)

        leader.set(False)
        clock.advance(5.0)
        await everywhere.reached(2)
        await settle()
        assert leader_only.count == 1  # woke up, found it does not lead, waits

        leader.set(True)
        await leader_only.reached(2)
    finally:
        await runner.stop()


async def test_run_once_returns_the_result_and_raises() -> None:
    clock = StepClock()
    runner = Runner(clock, FlipLeader())  # not leader: run_once ignores leadership
    ok = Pass(clock, results=lambda n: 1.5)
    bad = Pass(clock, fail=lambda n: True)
    runner.add(spec("ok", ok, leader_only=True))
    runner.add(spec("bad", bad))
    assert await runner.run_once("ok") == 1.5
    with pytest.raises(RuntimeError, match="pass 1 failed"):
        await runner.run_once("bad")
    with pytest.raises(KeyError):
        await runner.run_once("missing")
    with pytest.raises(KeyError):
        runner.wake("missing")


async def test_on_run_errors_do_not_stop_the_task() -> None:
    clock = StepClock()

    def broken_metrics(name: str, ok: bool, seconds: float) -> None:
        raise RuntimeError("metrics down")

    runner = Runner(clock, AlwaysLeader(), on_run=broken_metrics)
    task = Pass(clock)
    runner.add(spec("t", task, interval_s=1.0))
    runner.start()
    try:
        await clock.asleep(1)
        clock.advance(1.0)
        await task.reached(2)
    finally:
        await runner.stop()


async def test_always_leader() -> None:
    changes: list[bool] = []
    leader = AlwaysLeader(on_change=changes.append)
    leader.start()
    leader.start()
    assert leader.is_leader
    async with asyncio.timeout(SAFETY_S):
        await leader.wait_leader()
    await leader.stop()
    await leader.stop()
    assert changes == [True]
