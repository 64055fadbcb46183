"""Helpers shared by the object tests: ``ObjApi`` wraps an OwnerRefService stub with the
calls they repeat, and ``converge`` runs the garbage collector until nothing is due."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from tether_client.pb import common_pb2, owner_ref_pb2, owner_ref_pb2_grpc
from tether_server.app import TetherServer

from .conftest import WAIT_S

BACKGROUND = owner_ref_pb2.PROPAGATION_POLICY_BACKGROUND
FOREGROUND = owner_ref_pb2.PROPAGATION_POLICY_FOREGROUND
ORPHAN = owner_ref_pb2.PROPAGATION_POLICY_ORPHAN
FIN = "example.com/cleanup"


def ref(
    owner: owner_ref_pb2.Object, *, controller: bool = False, block: bool = False
) -> common_pb2.OwnerReference:
    return common_pb2.OwnerReference(
        kind=owner.kind,
        name=owner.name,
        uid=owner.uid,
        controller=controller,
        block_owner_deletion=block,
    )


@dataclass
class ObjApi:
    stub: owner_ref_pb2_grpc.OwnerRefServiceStub
    server: TetherServer
    namespace: str = ""

    @classmethod
    def on(cls, channel: grpc.aio.Channel, server: TetherServer) -> ObjApi:
        return cls(owner_ref_pb2_grpc.OwnerRefServiceStub(channel), server)

    async def create(
        self,
        name: str,
        kind: str = "Thing",
        owners: Sequence[common_pb2.OwnerReference] = (),
        finalizers: Sequence[str] = (),
        labels: dict[str, str] | None = None,
    ) -> owner_ref_pb2.Object:
        response = await self.stub.CreateObject(
            owner_ref_pb2.CreateObjectRequest(
                namespace=self.namespace,
                object=owner_ref_pb2.Object(
                    kind=kind,
                    name=name,
                    owner_references=list(owners),
                    finalizers=list(finalizers),
                    labels=labels or {},
                ),
            ),
            timeout=WAIT_S,
        )
        return response.object

    async def get(self, name: str, kind: str = "Thing") -> owner_ref_pb2.Object | None:
        try:
            response = await self.stub.GetObject(
                owner_ref_pb2.GetObjectRequest(namespace=self.namespace, kind=kind, name=name),
                timeout=WAIT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return response.object

    async def delete(
        self, name: str, policy: int = BACKGROUND, kind: str = "Thing"
    ) -> owner_ref_pb2.DeleteObjectResponse:
        return await self.stub.DeleteObject(
            owner_ref_pb2.DeleteObjectRequest(
                namespace=self.namespace,
                kind=kind,
                name=name,
                propagation_policy=policy,  # type: ignore[arg-type]
            ),
            timeout=WAIT_S,
        )

    async def remove_finalizer(
        self, name: str, finalizer: str = FIN, kind: str = "Thing", refusal: str = ""
    ) -> owner_ref_pb2.RemoveFinalizerResponse:
        return await self.stub.RemoveFinalizer(
            owner_ref_pb2.RemoveFinalizerRequest(
                namespace=self.namespace, kind=kind, name=name, finalizer=finalizer, refusal=refusal
            ),
            timeout=WAIT_S,
        )

    async def names(self, kind: str = "") -> set[str]:
        found: set[str] = set()
        token = ""
        while True:
            response = await self.stub.ListObjects(
                owner_ref_pb2.ListObjectsRequest(
                    namespace=self.namespace, kind=kind, page_token=token, page_size=1000
                ),
                timeout=WAIT_S,
            )
            found.update(o.name for o in response.objects)
            token = response.next_page_token
            if not token:
                return found

    async def converge(self) -> None:
        await converge(self.server)


async def converge(server: TetherServer, max_passes: int = 10_000) -> None:
    """Run collector passes until none finds a due item (parked owners wait for their
    dependents' finalizers and are not due)."""
    for _ in range(max_passes):
        done = await server.objects.collect()
        if done.items == 0:
            return
    raise AssertionError("the collector did not converge")
