"""Counters the server keeps in process; exported by the operations work (Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Metrics:
    keepalive_streams_open: int = 0
    keepalive_streams_total: int = 0
    keepalive_streams_broken: int = 0
    renewals_ok: int = 0
    renewals_refused: int = 0
    watch_streams_open: int = 0
