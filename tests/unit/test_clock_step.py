"""The clock-step guard: detection against the monotonic clock, hold-back, claim/accept."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.step_clock import StepClock
from tether_server.clock import MICROS, FakeClock, SystemClock
from tether_server.clock_step import Look, StepGuard

S = MICROS
THRESHOLD = 5 * S


def test_wall_and_monotonic_moving_together_is_no_step() -> None:
    guard = StepGuard(THRESHOLD)
    assert guard.look(1000 * S, 0) == Look(1000 * S)
    # An hour of ordinary time, and drift just under the threshold between two looks.
    assert guard.look(4600 * S, 3600 * S) == Look(4600 * S)
    assert guard.look(4610 * S + THRESHOLD, 3610 * S) == Look(4610 * S + THRESHOLD)
    assert guard.pending_us == 0


def test_a_forward_step_is_held_back_until_accepted() -> None:
    guard = StepGuard(THRESHOLD)
    guard.look(1000 * S, 0)
    look = guard.look(1000 * S + 3601 * S, 1 * S)
    assert look == Look(now_us=1001 * S, forward_us=3600 * S)
    # Time goes on from where it was, on the monotonic clock.
    assert guard.look(4611 * S, 11 * S).now_us == 1011 * S
    step = guard.claim()
    assert step == 3600 * S
    assert guard.claim() == 0, "a claimed step is not handed out twice"
    assert guard.look(4612 * S, 12 * S).now_us == 1012 * S, "held back until accepted"
    guard.accept(step)
    assert guard.look(4613 * S, 13 * S) == Look(4613 * S)
    assert guard.pending_us == 0


def test_a_released_claim_is_claimed_again() -> None:
    guard = StepGuard(THRESHOLD)
    guard.look(0, 0)
    guard.look(60 * S, 0)
    step = guard.claim()
    guard.release(step)
    assert guard.look(60 * S, 0).now_us == 0
    assert guard.claim() == 60 * S


def test_steps_add_up_and_a_step_during_a_shift_is_claimed_next() -> None:
    guard = StepGuard(THRESHOLD)
    guard.look(0, 0)
    guard.look(100 * S, 0)
    first = guard.claim()
    guard.look(300 * S, 0)
    assert guard.look(300 * S, 0).now_us == 0
    guard.accept(first)
    assert guard.look(300 * S, 0).now_us == 100 * S
    assert guard.claim() == 200 * S


def test_a_backward_step_cancels_an_unclaimed_forward_step_and_is_reported_beyond() -> None:
    guard = StepGuard(THRESHOLD)
    guard.look(1000 * S, 0)
    guard.look(1600 * S, 0)  # +600 s, held back
    look = guard.look(700 * S, 0)  # -900 s: 600 cancel the step, 300 are not corrected
    assert look == Look(now_us=700 * S, backward_us=300 * S)
    assert guard.pending_us == 0
    assert guard.claim() == 0


def test_a_backward_step_leaves_a_claimed_step_alone() -> None:
    guard = StepGuard(THRESHOLD)
    guard.look(1000 * S, 0)
    guard.look(1600 * S, 0)
    step = guard.claim()
    look = guard.look(1000 * S, 0)
    assert look.backward_us == 600 * S
    guard.accept(step)
    assert guard.pending_us == 0


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StepGuard(0)


def test_an_unguarded_fake_clock_reports_its_wall_clock() -> None:
    clock = FakeClock()
    start = clock.now_us()
    clock.step_wall(3600)
    assert clock.now_us() == start + 3600 * S
    assert clock.claim_step() == 0


def test_a_guarded_fake_clock_holds_a_wall_step_back_and_tells_its_listener() -> None:
    clock = StepClock()
    looks: list[Look] = []
    clock.guard_steps(THRESHOLD, looks.append)
    start = clock.now_us()
    clock.advance(3600)  # wall and monotonic together: no step
    assert clock.now_us() == start + 3600 * S
    assert looks == []
    clock.step_wall(3600)
    assert [look.forward_us for look in looks] == [3600 * S], "noticed by step_wall itself"
    assert clock.now_us() == start + 3600 * S
    clock.advance(1)
    assert clock.now_us() == start + 3601 * S
    step = clock.claim_step()
    clock.accept_step(step)
    assert clock.now_us() == start + 7201 * S
    assert clock.pending_step_us() == 0


async def test_a_wall_step_does_not_end_a_fake_clock_sleep() -> None:
    """Sleeps count monotonic time, as asyncio.sleep does for the system clock."""
    clock = FakeClock()
    clock.guard_steps(THRESHOLD)
    sleeper = asyncio.ensure_future(clock.sleep(10))
    await asyncio.sleep(0)
    clock.step_wall(3600)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(10)
    await asyncio.wait_for(sleeper, 5)


def test_the_system_clock_is_guarded_on_request_only() -> None:
    clock = SystemClock()
    assert not clock.step_guarded
    clock.guard_steps(THRESHOLD)
    assert clock.step_guarded
    assert clock.pending_step_us() == 0
