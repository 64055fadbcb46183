"""Wall-clock steps: detected against the monotonic clock, held back until deadlines move.

Pure bookkeeping (no time is read here, no store is touched): a clock feeds each of its
readings (wall, monotonic) to a ``StepGuard`` and returns the guard's ``now``.

A *forward step* is the wall clock advancing more than the monotonic clock between two
looks by over the threshold: an NTP step, a resumed VM or host (CLOCK_MONOTONIC does not
count a suspension). Left alone it would expire, at once, every lease whose remaining time
is shorter than the step. The guard instead keeps reporting the time the wall clock would
show without the step (``wall - pending``) until the store has moved every live deadline by
the step and the move has committed (``accept``); from then on it reports the wall clock
again. Nothing, the expiry loop included, judges a deadline by the stepped time before the
deadlines moved.

A *backward step* first cancels a forward step not yet being corrected (a clock that
flapped); the rest is not corrected (deadlines then last longer by it, never shorter) and is
only reported. Slow drift (NTP slewing) stays below the threshold between looks, and the
clock is read at least every second by the expiry loop.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_THRESHOLD_S = 5.0


@dataclass(frozen=True)
class Look:
    # What the clock reports: the wall clock minus the steps not yet accepted.
    now_us: int
    # A forward step detected by this look (0 if none): now held back.
    forward_us: int = 0
    # A backward step detected by this look that is not corrected (0 if none).
    backward_us: int = 0


class StepGuard:
    """Not thread-safe: the clock owning it serialises ``look``, ``claim`` and the rest."""

    def __init__(self, threshold_us: int) -> None:
        if threshold_us <= 0:
            raise ValueError("the clock-step threshold must be positive")
        self.threshold_us = threshold_us
        self._last: tuple[int, int] | None = None
        # Forward steps detected and not yet accepted, and the part of them a shift of the
        # store's deadlines is under way for (claimed, not yet accepted or released).
        self._pending = 0
        self._claimed = 0

    @property
    def pending_us(self) -> int:
        return self._pending

    def look(self, wall_us: int, mono_us: int) -> Look:
        last, self._last = self._last, (wall_us, mono_us)
        forward = backward = 0
        if last is not None:
            drift = (wall_us - last[0]) - (mono_us - last[1])
            if drift > self.threshold_us:
                forward = drift
                self._pending += drift
            elif drift < -self.threshold_us:
                # A step back undoes a forward step that no shift is correcting yet.
                cancel = min(max(0, self._pending - self._claimed), -drift)
                self._pending -= cancel
                backward = -drift - cancel
        return Look(wall_us - self._pending, forward, backward)

    def claim(self) -> int:
        """The step a shift of the deadlines should correct now (0: nothing to do); it is
        claimed until ``accept`` (the shift committed) or ``release`` (it failed)."""
        step = self._pending - self._claimed
        self._claimed += step
        return step

    def accept(self, step_us: int) -> None:
        """The deadlines moved by ``step_us`` (committed): report the wall clock again."""
        self._claimed -= step_us
        self._pending -= step_us

    def release(self, step_us: int) -> None:
        """The shift of ``step_us`` failed: still held back, to be claimed again."""
        self._claimed -= step_us
