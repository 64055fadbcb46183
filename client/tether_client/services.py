"""Clients for SagaService, OwnerRefService and SweepService (request messages in, out)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether_client.client import TetherClient


class SagasClient:
    def __init__(self, client: TetherClient) -> None:
        self._client = client


class ObjectsClient:
    def __init__(self, client: TetherClient) -> None:
        self._client = client


class SweepsClient:
    def __init__(self, client: TetherClient) -> None:
        self._client = client
