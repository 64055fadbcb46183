"""The generated tether.v1 messages and stubs under short names.

``from tether_client.pb import lease_pb2`` instead of reaching into ``_gen``.
"""

from tether_client._gen.tether.v1 import (
    common_pb2,
    lease_pb2,
    lease_pb2_grpc,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
    sweep_pb2_grpc,
)

__all__ = [
    "common_pb2",
    "lease_pb2",
    "lease_pb2_grpc",
    "owner_ref_pb2",
    "owner_ref_pb2_grpc",
    "saga_pb2",
    "saga_pb2_grpc",
    "sweep_pb2",
    "sweep_pb2_grpc",
]
