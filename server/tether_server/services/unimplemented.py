"""Services whose RPCs belong to areas not built yet: every call answers UNIMPLEMENTED with
reason NOT_IMPLEMENTED naming the area, never a fake success."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from tether_server.domain.errors import NotImplementedYet


class Unimplemented:
    def __init__(self, service: ServiceDescriptor, area: str) -> None:
        self._service = service
        self._area = area

    def __getattr__(self, method: str) -> Callable[..., Any]:
        descriptor = self._service.methods_by_name.get(method)
        if descriptor is None:
            raise AttributeError(method)
        error = NotImplementedYet(
            f"{self._service.full_name}/{method} is not implemented yet: it arrives with the "
            f"{self._area} work",
            {"service": self._service.full_name, "method": method, "area": self._area},
        )
        if descriptor.server_streaming:

            async def stream(*_args: Any) -> Any:
                raise error
                yield  # an async generator, like the real streaming handlers

            return stream

        async def unary(*_args: Any) -> Any:
            raise error

        return unary
