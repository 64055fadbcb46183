"""A FakeClock that records each sleep request, so a test knows a background loop (a
runner task, a leader elector) has finished a step and is asleep.

Like every FakeClock it can also step its wall clock alone (``step_wall``: an NTP step, a
resumed VM), which a guarded clock holds back until deadlines moved (docs/clock.md)."""

from __future__ import annotations

import asyncio

from tether_server.clock import FakeClock

# Only a bound against hangs; no assertion depends on how fast anything runs.
SAFETY_S = 10.0


class StepClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self._slept = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._slept.set()
        self._slept = asyncio.Event()
        await super().sleep(seconds)

    async def asleep(self, count: int) -> float:
        """Wait until ``count`` sleeps have been requested; return the last one."""
        async with asyncio.timeout(SAFETY_S):
            while len(self.sleeps) < count:
                await self._slept.wait()
        return self.sleeps[count - 1]
