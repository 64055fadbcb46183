"""A protocol fuzzer for every tether.v1 RPC, built from the service descriptors.

``discover_rpcs`` finds every method of every service in the generated ``tether.v1`` modules,
so a new RPC (or a new service) is fuzzed without editing a test. ``Fuzzer`` draws inputs
with hypothesis in three families:

- ``generated``: messages built field by field from the message descriptors. Each value is
  either *plausible* (drawn from what the server has answered so far: ids, keys, fences,
  page tokens, whole submessages such as ``Fence`` and ``Object``) so that calls get past
  validation into the store, or *wild* (NUL, control characters, bidi marks, huge strings,
  integers at the type's extremes, out-of-range enums, Durations and Timestamps with extreme
  seconds/nanos, NaN and infinities in Structs, long repeated and map fields, page tokens
  whose positions were tampered with but whose query digest is intact).
- ``mutated``: a request the server accepted earlier (its corpus per method), serialized,
  with bytes flipped, inserted, deleted, duplicated or cut.
- ``raw``: random bytes, or random protobuf-looking fields (right and wrong wire types,
  lengths that overrun, varints that never end).

Everything is sent as bytes through a generic channel call (identity serializers), so
malformed encodings reach the server. ``Fuzzer.send`` returns an ``Outcome``; the caller
decides which status codes are faults.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import json
import pkgutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

from tests.support import error_contract

GEN_PACKAGE = "tether_client._gen.tether.v1"

Metadata = tuple[tuple[str, str], ...]
# The details grpc's aio client gives a call whose send failed in the core library.
CLIENT_CORE_ERROR = "Internal error from Core"
# Outcome.reason of a failed call whose status carries no ErrorInfo.
NO_ERROR_INFO = "(no ErrorInfo)"


# ---- what to fuzz ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.method.containing_service.name}/{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_type(self) -> Descriptor:
        return self.method.input_type

    @property
    def bidi(self) -> bool:
        return self.method.client_streaming and self.method.server_streaming

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming and not self.method.client_streaming

    def request_class(self) -> Any:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> Any:
        return message_factory.GetMessageClass(self.method.output_type)


def discover_rpcs(package: str = GEN_PACKAGE) -> list[Rpc]:
    """Every method of every service declared in the generated modules of ``package``."""
    rpcs: list[Rpc] = []
    root = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            rpcs.extend(Rpc(method) for method in service.methods)
    return rpcs


# ---- what the server has said: the plausible values -------------------------------------------

# A response field whose values are plausible for a request field of another name.
_ALIASES = {
    "next_page_token": "page_token",
    "revision": "start_revision",
    "mod_revision": "start_revision",
    "create_revision": "start_revision",
    "key": "key_prefix",
    "uid": "owner_uid",
    "finalizers": "finalizer",
    "pending_finalizers": "finalizer",
    "text": "reason",
}
_MAX_VALUES_PER_FIELD = 64
_MAX_MESSAGES_PER_TYPE = 32


@dataclass
class Pool:
    """Plausible values, by field name (scalars) and by message type (submessages).

    Bounded rings, filled from the seed requests and every response, so what is drawn
    depends only on the order of answers (not on their number)."""

    scalars: dict[str, list[Any]] = field(default_factory=dict)
    messages: dict[str, list[bytes]] = field(default_factory=dict)
    _seen: set[tuple[str, Any]] = field(default_factory=set)

    def add_scalar(self, name: str, value: Any) -> None:
        if isinstance(value, str | bytes) and len(value) > 600:
            return
        marker = (name, value)
        if marker in self._seen:
            return
        self._seen.add(marker)
        ring = self.scalars.setdefault(name, [])
        ring.append(value)
        if len(ring) > _MAX_VALUES_PER_FIELD:
            self._seen.discard((name, ring.pop(0)))

    def add_message(self, msg: message.Message) -> None:
        data = msg.SerializeToString(deterministic=True)
        name = msg.DESCRIPTOR.full_name
        marker = (name, data)
        if marker in self._seen or len(data) > 4096:
            return
        self._seen.add(marker)
        ring = self.messages.setdefault(name, [])
        ring.append(data)
        if len(ring) > _MAX_MESSAGES_PER_TYPE:
            self._seen.discard((name, ring.pop(0)))

    def harvest(self, msg: message.Message) -> None:
        """Every set scalar and every submessage of ``msg``, recursively."""
        self.add_message(msg)
        for fd, value in msg.ListFields():
            if _is_map(fd):
                value_fd = _sub(fd).fields_by_name["value"]
                for key, item in value.items():
                    self._harvest_value(fd.name + ".key", key)
                    if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                        self.harvest(item)
                    else:
                        self._harvest_value(fd.name + ".value", item)
                continue
            items = value if fd.is_repeated else [value]
            for item in items:
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    self.harvest(item)
                else:
                    self._harvest_value(fd.name, item)

    def _harvest_value(self, name: str, value: Any) -> None:
        self.add_scalar(name, value)
        if name in _ALIASES:
            self.add_scalar(_ALIASES[name], value)

    def values(self, name: str) -> list[Any]:
        return self.scalars.get(name, [])


# Seed values for field names the server has not answered yet.
_STATIC_STRINGS: dict[str, list[str]] = {
    "namespace": ["", "default", "team-a", "fuzz"],
    "key": ["jobs/a", "jobs/b", "fuzz/k1"],
    "key_prefix": ["", "jobs/", "fuzz/"],
    "holder": ["w1", "w2", "fuzz-holder"],
    "kind": ["Thing", "build", "fuzz"],
    "name": ["a", "b", "step-1"],
    "finalizer": ["example.com/cleanup", "fuzz.dev/f"],
    "label_selector": ["", "team=a", "team in (a,b)", "!team", "team!=a,x"],
    "reason": ["", "because"],
    "request_id": ["", "r1"],
}
_GENERIC_STRINGS = ["", "a", "x-1", "default"]


# ---- wild values -------------------------------------------------------------------------------

_SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t",
    "\n",
    "\r\n",
    "\x7f",
    "\x85",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\ufffd",
    "\U0010ffff",
    "é",
    "😀",
    "/",
    "a/",
    "/a",
    "a//b",
    "..",
    "../x",
    ".",
    "*",
    "%",
    "_",
    "\\",
    "'",
    '"',
    "%s%n",
    "'; DROP TABLE leases; --",
    "a b",
    "-a",
    "A",
    "NaN",
    "0",
    "-1",
    "null",
    "{}",
    "in (",
    "=",
    "!=",
    ",",
]
_LENGTHS = [63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1024, 4096, 70_000]

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def wild_text() -> st.SearchStrategy[str]:
    return _WILD_TEXT


def _make_wild_text() -> st.SearchStrategy[str]:
    # Protobuf strings are UTF-8: no lone surrogates (category Cs) on the wire.
    chars = st.characters(exclude_categories=["Cs"])
    return st.one_of(
        st.sampled_from(_SPECIAL_STRINGS),
        st.text(chars, max_size=12),
        st.text(st.characters(max_codepoint=0x9F), max_size=12),
        st.tuples(st.sampled_from(["k", "é", "😀", "\x00"]), st.sampled_from(_LENGTHS)).map(
            lambda t: t[0] * t[1]
        ),
    )


_WILD_TEXT = _make_wild_text()


def wild_int(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, lo + 1, -1, 0, 1, 2, 1000, hi - 1, hi) if lo <= v <= hi})
    powers = [v for p in (7, 8, 15, 16, 31, 32, 53, 63) for v in (2**p - 1, 2**p, -(2**p))]
    return st.one_of(
        st.sampled_from(edges + [v for v in powers if lo <= v <= hi]),
        st.integers(lo, hi),
        st.integers(-3, 300).filter(lambda v: lo <= v <= hi),
    )


_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 2.0**53, 2.0**63, 2.0**64]),
)


# ---- message strategies --------------------------------------------------------------------------


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and bool(_sub(fd).GetOptions().map_entry)


def _sub(fd: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


_MAX_DEPTH = 5


class Fuzzer:
    """Draws fuzz inputs for ``rpcs``, biased by ``pool``, and sends them."""

    def __init__(
        self,
        rpcs: Sequence[Rpc],
        pool: Pool | None = None,
        now_s: Callable[[], float] | None = None,
    ) -> None:
        self.rpcs = list(rpcs)
        self.pool = pool or Pool()
        # The server's time, for plausible Timestamps (a test passes its fake clock).
        self.now_s = now_s or (lambda: 1_700_000_000.0)
        # Percent of values drawn wild in the message being built (set per input, read
        # at draw time): 0 gives requests that pass validation and reach the store.
        self.wild_percent = 30
        # Requests the server accepted, per method: the seeds for mutation.
        self.corpus: dict[str, list[bytes]] = {rpc.name: [] for rpc in self.rpcs}
        # Strategies read the pool and corpus when drawing, so they can be built once.
        self._message_cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}
        self._input_cache: dict[str, st.SearchStrategy[FuzzInput]] = {}
        self._scalar_cache: dict[tuple[int, str, str], st.SearchStrategy[Any]] = {}

    # -- values

    def _plausible(
        self, name: str, kind: type | tuple[type, ...], fallback: Sequence[Any]
    ) -> st.SearchStrategy[Any]:
        """A value of ``kind`` the server has shown for a field of this name (chosen at
        draw time, from the pool as it is then), else one of ``fallback``."""

        def pick(index: int) -> Any:
            values = [
                v
                for v in self.pool.values(name)
                if isinstance(v, kind) and not (isinstance(v, bool) and kind is int)
            ] or list(fallback)
            return values[index % len(values)]

        return st.integers(0, 1 << 16).map(pick)

    def _string(self, name: str) -> st.SearchStrategy[str]:
        plausible = self._plausible(name, str, _STATIC_STRINGS.get(name, _GENERIC_STRINGS))
        variants: list[st.SearchStrategy[str]] = [wild_text()]
        # A plausible value with one character changed, added or removed.
        variants.append(
            st.tuples(plausible, st.integers(0, 600), wild_text()).map(
                lambda t: t[0][: t[1]] + t[2][:2] + t[0][t[1] + 1 :]
            )
        )
        if name.endswith("page_token"):
            variants.append(self._tampered_token(plausible))
        return st.one_of(*variants)

    def _tampered_token(self, plausible: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        """A page token the server issued, its position replaced, its digest kept: what
        anyone can compute, so what the server must check."""
        part = st.one_of(
            st.text(max_size=8),  # includes lone surrogates: JSON carries them as \\udxxx
            st.sampled_from(["\ud800", "\x00", "a\x00", "k" * 600, "", "\U0010ffff"]),
            st.integers(-(2**70), 2**70),
            st.sampled_from([2**63, 2**63 - 1, -(2**63) - 1, -1, 0]),
            st.floats(allow_nan=False),
            st.booleans(),
            st.none(),
            st.just([[]]),
            st.just({"a": 1}),
        )
        return st.tuples(plausible, st.lists(part, max_size=4)).map(lambda t: _retoken(t[0], t[1]))

    def _scalar(self, fd: FieldDescriptor, name: str) -> st.SearchStrategy[Any]:
        enum = fd.enum_type.full_name if fd.enum_type is not None else ""
        key = (fd.type, name, enum)
        cached = self._scalar_cache.get(key)
        if cached is None:
            cached = self._scalar_cache[key] = self._make_scalar(fd, name)
        return cached

    def _make_scalar(self, fd: FieldDescriptor, name: str) -> st.SearchStrategy[Any]:
        return self._tame_or_wild(self._tame_scalar(fd, name), self._wild_scalar(fd, name))

    def _tame_or_wild(
        self, tame: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]
    ) -> st.SearchStrategy[Any]:
        @st.composite
        def pick(draw: st.DrawFn) -> Any:
            return draw(wild if draw(st.integers(0, 99)) < self.wild_percent else tame)

        return pick()

    def _tame_scalar(self, fd: FieldDescriptor, name: str) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self._plausible(name, str, _STATIC_STRINGS.get(name, _GENERIC_STRINGS))
        if kind == FieldDescriptor.TYPE_BYTES:
            return self._plausible(name, bytes, [b"", b"progress", b"\x00\x01"])
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.sampled_from([0.0, 0.5, 1.0, 42.0])
        if kind == FieldDescriptor.TYPE_ENUM:
            assert fd.enum_type is not None
            return st.sampled_from([v.number for v in fd.enum_type.values])
        lo, hi = _INT_RANGES[kind]
        # What the server has shown for this field name (fencing tokens, revisions, step
        # indexes), or a small count.
        harvested = self._plausible(name, int, [1]).map(lambda v: min(max(v, lo), hi))
        return st.one_of(st.integers(max(lo, 0), min(hi, 5)), harvested)

    def _wild_scalar(self, fd: FieldDescriptor, name: str) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self._string(name)
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.one_of(
                st.binary(max_size=64),
                st.sampled_from([b"", b"\x00", b"\xff" * 300, b"p" * 70_000]),
            )
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return _FLOATS if kind == FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
        lo, hi = _INT_RANGES[kind]
        return wild_int(lo, hi)

    def message_of(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
        """A message of ``descriptor``: built field by field, or one the server answered
        (whole, or with built fields on top) once there is one."""
        key = (descriptor.full_name, depth)
        cached = self._message_cache.get(key)
        if cached is None:
            cached = self._message_cache[key] = self._message(descriptor, depth)
        return cached

    def _message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Any]:
        built = self._built(descriptor, depth)
        if depth >= _MAX_DEPTH:
            return built
        cls = message_factory.GetMessageClass(descriptor)

        @st.composite
        def choose(draw: st.DrawFn) -> Any:
            # Read at draw time: the pool grows as the server answers.
            # The same draws whatever the pool holds: hypothesis replays examples and
            # refuses a strategy whose draws change shape with outside state.
            how = draw(st.integers(0, 2))
            index = draw(st.integers(0, 1 << 16))
            fresh = draw(built)
            known = self.pool.messages.get(descriptor.full_name)
            if not known or how == 0:
                return fresh
            harvested = cls.FromString(known[index % len(known)])
            return harvested if how == 1 else _overlay((harvested, fresh))

        return choose()

    def _built(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Any]:
        special = _WELL_KNOWN.get(descriptor.full_name)
        if special is not None:
            return self._tame_or_wild(self._tame_well_known(descriptor, depth), special(depth))
        cls = message_factory.GetMessageClass(descriptor)

        @st.composite
        def build(draw: st.DrawFn) -> Any:
            msg = cls()
            oneof_choice = {
                oneof.name: draw(st.sampled_from([None, *oneof.fields]))
                for oneof in descriptor.oneofs
                if len(oneof.fields) > 1
            }
            for fd in descriptor.fields:
                group = fd.containing_oneof
                if group is not None and group.name in oneof_choice:
                    if oneof_choice[group.name] is not fd:
                        continue
                elif draw(st.integers(0, 99)) >= self._presence_percent():
                    continue
                self._fill(draw, msg, fd, depth)
            return msg

        return build()

    def _tame_well_known(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Any]:
        from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

        name = descriptor.full_name
        if name == "google.protobuf.Duration":
            return st.sampled_from([1, 5, 10, 30, 60, 300, 600, 3600]).map(
                lambda s: duration_pb2.Duration(seconds=s)
            )
        if name == "google.protobuf.Timestamp":
            return st.sampled_from([-3600, 0, 1, 60, 3600, 86_400]).map(
                lambda offset: timestamp_pb2.Timestamp(seconds=int(self.now_s()) + offset)
            )
        simple = st.one_of(
            st.builds(struct_pb2.Value, string_value=st.sampled_from(["a", "main", ""])),
            st.builds(struct_pb2.Value, number_value=st.sampled_from([0.0, 1.0, 2.5])),
            st.builds(struct_pb2.Value, bool_value=st.booleans()),
        )
        if name == "google.protobuf.Value":
            return simple
        return st.dictionaries(st.sampled_from(["a", "repo", "n"]), simple, max_size=3).map(
            lambda fields: struct_pb2.Struct(fields=fields)
        )

    def _presence_percent(self) -> int:
        # Tame requests set most fields (required ones are then usually there).
        return 85 if self.wild_percent <= 10 else 50

    def _fill(self, draw: st.DrawFn, msg: Any, fd: FieldDescriptor, depth: int) -> None:
        if _is_map(fd):
            key_fd = _sub(fd).fields_by_name["key"]
            value_fd = _sub(fd).fields_by_name["value"]
            target = getattr(msg, fd.name)
            keys = self._scalar(key_fd, fd.name + ".key")
            for index in range(draw(_counts())):
                # Past the drawn ones, distinct keys (a map would merge repeats).
                key = draw(keys) if index < _DRAWN else _distinct_key(key_fd, index)
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    value = draw(self.message_of(_sub(value_fd), depth + 1))
                    target[key].CopyFrom(value)
                else:
                    target[key] = draw(self._scalar(value_fd, fd.name + ".value"))
            return
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= _MAX_DEPTH:
                return
            sub = self.message_of(_sub(fd), depth + 1)
            if fd.is_repeated:
                repeated = getattr(msg, fd.name)
                drawn: list[Any] = []
                for index in range(draw(_counts(depth))):
                    repeated.add().CopyFrom(_nth(index, drawn, lambda: draw(sub)))
            else:
                getattr(msg, fd.name).CopyFrom(draw(sub))
            return
        value = self._scalar(fd, fd.name)
        if fd.is_repeated:
            drawn_values: list[Any] = []
            getattr(msg, fd.name).extend(
                _nth(index, drawn_values, lambda: draw(value)) for index in range(draw(_counts()))
            )
        else:
            setattr(msg, fd.name, draw(value))

    # -- inputs

    def batches(self) -> st.SearchStrategy[list[FuzzInput]]:
        """One input for every RPC, in order: each method gets the same share, however
        hypothesis favours some choices, and a shrunk batch still names every method."""
        return st.tuples(*(self.inputs_for(rpc) for rpc in self.rpcs)).map(list)

    def inputs_for(self, rpc: Rpc) -> st.SearchStrategy[FuzzInput]:
        cached = self._input_cache.get(rpc.name)
        if cached is None:
            cached = self._input_cache[rpc.name] = self._inputs_for(rpc)
        return cached

    def _inputs_for(self, rpc: Rpc) -> st.SearchStrategy[FuzzInput]:
        generated = self.message_of(rpc.request_type)
        mutated = self._mutated(rpc)

        @st.composite
        def one(draw: st.DrawFn) -> tuple[str, bytes]:
            # 0-59 generated (a third of them tame), 60-84 mutated, 85-99 raw bytes;
            # hypothesis shrinks towards 0, a tame generated request.
            family = draw(st.integers(0, 99))
            if family < 60:
                self.wild_percent = (0, 0, 5, 10, 30, 60)[family % 6]
                try:
                    return "generated", draw(generated).SerializeToString()
                finally:
                    self.wild_percent = 30
            if family < 85:
                self.wild_percent = 5
                try:
                    return draw(mutated)
                finally:
                    self.wild_percent = 30
            return "raw", draw(raw_bytes())

        if not rpc.bidi:
            return one().map(lambda t: FuzzInput(rpc, t[0], (t[1],)))
        return st.lists(one(), min_size=1, max_size=4).map(
            lambda items: FuzzInput(rpc, items[0][0], tuple(data for _, data in items))
        )

    def _mutated(self, rpc: Rpc) -> st.SearchStrategy[tuple[str, bytes]]:
        def seed(index: int) -> bytes:
            seeds = self.corpus[rpc.name]
            return seeds[index % len(seeds)] if seeds else b""

        seeds = st.one_of(
            st.integers(0, 1 << 16).map(seed),
            self.message_of(rpc.request_type).map(lambda m: m.SerializeToString()),
        )
        return st.tuples(seeds, st.lists(_mutation(), min_size=1, max_size=4)).map(
            lambda t: ("mutated", _apply(t[0], t[1]))
        )

    def remember(self, rpc: Rpc, request: bytes, responses: Iterable[bytes]) -> None:
        """A call that succeeded: its request seeds mutation, its answers the pool."""
        seeds = self.corpus[rpc.name]
        if request and len(request) <= 4096 and request not in seeds:
            seeds.append(request)
            if len(seeds) > 64:
                seeds.pop(0)
        cls = rpc.response_class()
        for data in responses:
            try:
                self.pool.harvest(cls.FromString(data))
            except message.DecodeError:  # pragma: no cover - the server sent it
                continue

    def seed(self, rpc_name: str, request: message.Message, response: message.Message) -> None:
        """A request and response from the set-up (made through the typed stubs)."""
        self.pool.harvest(request)
        rpc = next(r for r in self.rpcs if r.name == rpc_name)
        self.remember(rpc, request.SerializeToString(), [response.SerializeToString()])

    async def send(
        self,
        channel: grpc.aio.Channel,
        item: FuzzInput,
        *,
        metadata: Metadata,
        unary_timeout: float,
        stream_timeout: float,
        stream_idle: float,
        max_stream_messages: int = 3,
    ) -> Outcome:
        """Send ``item``; a stream is read until it ends, goes ``stream_idle`` seconds
        without a message or has given ``max_stream_messages``, then cancelled."""
        identity: dict[str, Callable[[bytes], bytes]] = {
            "request_serializer": _identity,
            "response_deserializer": _identity,
        }
        rpc = item.rpc
        responses: list[bytes] = []
        try:
            if rpc.bidi or rpc.server_streaming:
                if rpc.bidi:
                    call: Any = channel.stream_stream(rpc.path, **identity)(
                        None, metadata=metadata, timeout=stream_timeout
                    )
                    try:
                        for data in item.payloads:
                            await call.write(data)
                        await call.done_writing()
                    except asyncio.InvalidStateError:
                        pass  # the server ended the stream first: its status is the answer
                else:
                    call = channel.unary_stream(rpc.path, **identity)(
                        item.payloads[0], metadata=metadata, timeout=stream_timeout
                    )
                left_open = await _drain(call, responses, stream_idle, max_stream_messages)
                if left_open:
                    call.cancel()
                    self._remember_all(rpc, item, responses)
                    return Outcome(item, grpc.StatusCode.OK, "", responses, None, left_open=True)
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    return Outcome(item, code, await call.details() or "", responses, None)
            else:
                responses.append(
                    await channel.unary_unary(rpc.path, **identity)(
                        item.payloads[0], metadata=metadata, timeout=unary_timeout
                    )
                )
        except grpc.aio.AioRpcError as exc:
            outcome = Outcome(item, exc.code(), exc.details() or "", responses, exc)
            # grpc's client (not the server) reports a bidi call that the server ended
            # while we were still writing as INTERNAL "Internal error from Core": the
            # server's own status is lost. Counted apart, not a server fault.
            outcome.client_side = (
                rpc.bidi
                and exc.code() == grpc.StatusCode.INTERNAL
                and exc.details() == CLIENT_CORE_ERROR
            )
            return outcome
        self._remember_all(rpc, item, responses)
        return Outcome(item, grpc.StatusCode.OK, "", responses, None)

    def _remember_all(self, rpc: Rpc, item: FuzzInput, responses: list[bytes]) -> None:
        for payload in item.payloads:
            self.remember(rpc, payload, responses)


async def _drain(call: Any, into: list[bytes], idle_s: float, most: int) -> bool:
    """Read a stream into ``into`` until it ends (False) or has been idle for ``idle_s``
    or given ``most`` messages (True: still open)."""
    while len(into) < most:
        try:
            # A timed-out read cancels the call, which we would do now anyway.
            got = await asyncio.wait_for(call.read(), idle_s)
        except TimeoutError:
            return True
        if got is grpc.aio.EOF:  # type: ignore[attr-defined]
            return False
        into.append(got)
    return True


@dataclass(frozen=True)
class FuzzInput:
    rpc: Rpc
    origin: str  # generated, mutated or raw
    payloads: tuple[bytes, ...]

    def __repr__(self) -> str:
        shown = ", ".join(_short_hex(p) for p in self.payloads)
        return f"FuzzInput({self.rpc.name}, {self.origin}, [{shown}])"


@dataclass
class Outcome:
    input: FuzzInput
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    error: grpc.aio.AioRpcError | None
    # A stream still open when we stopped reading it (and cancelled it).
    left_open: bool = False
    # The status is the client library's, not the server's (see Fuzzer.send).
    client_side: bool = False

    @property
    def oversized_trailers(self) -> bool:
        """The server's answer did not reach us: its trailers (status message and details)
        passed the client's 8 KiB metadata limit, and grpc reports RESOURCE_EXHAUSTED."""
        return (
            self.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "Stream removed" in self.details
            and "vs. " in self.details
        )

    @property
    def reason(self) -> str:
        """The ErrorInfo reason, with the field it names if any."""
        if self.error is None:
            return ""
        if self.oversized_trailers:
            return "(trailers too large for the client)"
        try:
            status = rpc_status.from_call(self.error)  # type: ignore[arg-type]
        except ValueError:  # the code in the details is not the call's
            return "(status details disagree with the code)"
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                error_contract.check(self.code, info.reason, info.metadata)
                where = info.metadata.get("field", "")
                return f"{info.reason}:{where}" if where else info.reason
        return NO_ERROR_INFO

    @property
    def answer(self) -> str:
        if self.client_side:
            return "CLIENT_WRITE_RACE"
        if self.oversized_trailers:
            return "TRAILERS_TOO_LARGE"
        return "OPEN" if self.left_open else self.code.name

    def describe(self) -> str:
        payloads = "\n".join(f"  request bytes (hex): {p.hex()}" for p in self.input.payloads)
        return (
            f"{self.input.rpc.name} ({self.input.origin}) answered {self.code.name}: "
            f"{self.details!r}\n{payloads}"
        )


@dataclass
class Tally:
    """How many inputs went to each method, by family, and what they were answered."""

    by_method: Counter[str] = field(default_factory=Counter)
    by_origin: Counter[str] = field(default_factory=Counter)
    by_code: Counter[str] = field(default_factory=Counter)
    by_method_code: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Real seconds spent drawing inputs and sending them.
    seconds: dict[str, float] = field(default_factory=lambda: {"draw": 0.0, "send": 0.0})
    notes: dict[str, object] = field(default_factory=dict)
    # The first inputs whose answer was lost to oversized trailers (method, details, hex).
    oversized: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        name = outcome.input.rpc.name
        self.by_method[name] += 1
        self.by_origin[outcome.input.origin] += 1
        self.by_code[outcome.answer] += 1
        self.by_method_code[(name, outcome.answer)] += 1
        if outcome.reason:
            self.by_reason[(name, outcome.reason)] += 1
        if outcome.oversized_trailers and len(self.oversized) < 5:
            self.oversized.append(
                f"{name}: {outcome.details} {_short_hex(outcome.input.payloads[0])}"
            )

    @property
    def total(self) -> int:
        return sum(self.by_method.values())

    def as_dict(self) -> dict[str, Any]:
        per_method: dict[str, dict[str, int]] = {}
        for (name, code), count in sorted(self.by_method_code.items()):
            per_method.setdefault(name, {})[code] = count
        return {
            "total": self.total,
            "by_origin": dict(sorted(self.by_origin.items())),
            "by_code": dict(sorted(self.by_code.items())),
            "by_method": {name: dict(codes) for name, codes in per_method.items()},
            "refusals": {
                f"{name} {reason}": count for (name, reason), count in self.by_reason.most_common()
            },
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "oversized_trailers": self.oversized,
            **self.notes,
        }

    def summary(self) -> str:
        lines = [
            f"{self.total} inputs; by family: {dict(sorted(self.by_origin.items()))}",
            "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.seconds.items())),
            *(f"{k}: {v}" for k, v in self.notes.items()),
            *(f"trailers too large: {line}" for line in self.oversized),
            f"answers: {dict(sorted(self.by_code.items()))}",
        ]
        for name in sorted(self.by_method):
            codes = {c: n for (m, c), n in self.by_method_code.items() if m == name}
            lines.append(f"  {name}: {self.by_method[name]} {dict(sorted(codes.items()))}")
        return "\n".join(lines)


# ---- well-known types --------------------------------------------------------------------------


def _duration_like(cls: Any) -> Callable[[int], st.SearchStrategy[Any]]:
    def strategy(depth: int) -> st.SearchStrategy[Any]:
        del depth
        seconds = st.one_of(
            st.sampled_from([0, 1, 10, 59, 60, 61, 300, 301, 3600, 3601, 86_400, -1]),
            # Timestamp's valid range ends at 253402300799 (9999-12-31).
            st.sampled_from([253_402_300_799, 253_402_300_800, -62_135_596_800, -62_135_596_801]),
            st.sampled_from([315_576_000_000, 315_576_000_001, 2**62, 2**63 - 1, -(2**63)]),
            st.integers(-(2**63), 2**63 - 1),
            st.integers(0, 2_000_000_000),
        )
        nanos = st.one_of(
            st.just(0),
            st.sampled_from([1, 999, 1000, 500_000_000, 999_999_999, 1_000_000_000, -1]),
            st.integers(-(2**31), 2**31 - 1),
        )
        return st.builds(cls, seconds=seconds, nanos=nanos)

    return strategy


_VALUE_CACHE: dict[int, st.SearchStrategy[Any]] = {}


def _value(depth: int) -> st.SearchStrategy[Any]:
    cached = _VALUE_CACHE.get(depth)
    if cached is None:
        cached = _VALUE_CACHE[depth] = _make_value(depth)
    return cached


def _make_value(depth: int) -> st.SearchStrategy[Any]:
    from google.protobuf import struct_pb2

    leaves = st.one_of(
        st.builds(struct_pb2.Value, null_value=st.just(0)),
        st.builds(struct_pb2.Value, number_value=_FLOATS),
        st.builds(struct_pb2.Value, string_value=wild_text()),
        st.builds(struct_pb2.Value, bool_value=st.booleans()),
        st.just(struct_pb2.Value()),  # no kind set at all
        # An enum value JSON has no name for.
        st.builds(struct_pb2.Value, null_value=st.integers(1, 2**31 - 1)),
    )
    if depth >= _MAX_DEPTH:
        return leaves

    def nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        lists = st.lists(children, max_size=4).map(
            lambda items: struct_pb2.Value(list_value=struct_pb2.ListValue(values=items))
        )
        structs = st.dictionaries(wild_text(), children, max_size=4).map(
            lambda items: struct_pb2.Value(struct_value=struct_pb2.Struct(fields=items))
        )
        return st.one_of(lists, structs)

    deep = st.integers(0, 30).map(_deeply_nested)
    return st.one_of(st.recursive(leaves, nest, max_leaves=12), deep)


def _deeply_nested(levels: int) -> Any:
    """A Value nested ``levels`` deep (deeper than the Python runtime builds: see
    ``_nested_bytes`` for what only raw bytes can carry)."""
    from google.protobuf import struct_pb2

    value = struct_pb2.Value(string_value="bottom")
    for level in range(levels):
        if level % 2:
            value = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[value]))
        else:
            value = struct_pb2.Value(struct_value=struct_pb2.Struct(fields={"n": value}))
    return value


def _struct(depth: int) -> st.SearchStrategy[Any]:
    from google.protobuf import struct_pb2

    return st.one_of(
        st.dictionaries(wild_text(), _value(depth + 1), max_size=5).map(
            lambda items: struct_pb2.Struct(fields=items)
        ),
        st.integers(0, 30).map(lambda n: struct_pb2.Struct(fields={"deep": _deeply_nested(n)})),
    )


def _make_well_known() -> dict[str, Callable[[int], st.SearchStrategy[Any]]]:
    from google.protobuf import duration_pb2, timestamp_pb2

    return {
        "google.protobuf.Duration": _duration_like(duration_pb2.Duration),
        "google.protobuf.Timestamp": _duration_like(timestamp_pb2.Timestamp),
        "google.protobuf.Value": _value,
        "google.protobuf.Struct": _struct,
    }


_WELL_KNOWN = _make_well_known()


# ---- bytes -------------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


def _short_hex(data: bytes, limit: int = 96) -> str:
    text = data.hex()
    return text if len(text) <= limit * 2 else f"{text[: limit * 2]}...({len(data)} bytes)"


def _counts(depth: int = 0) -> st.SearchStrategy[int]:
    """How many entries a repeated or map field gets: a few, or (at the top) past the
    limits. Only the first four are drawn; the rest repeat them (drawing a thousand
    values costs more than sending them)."""
    many = [0, 1, 2, 3] if depth else [0, 1, 2, 3, 65, 200, 1001]
    return st.one_of(st.integers(0, 3), st.sampled_from(many))


_DRAWN = 4


def _nth(index: int, drawn: list[Any], fresh: Callable[[], Any]) -> Any:
    if index < _DRAWN:
        drawn.append(fresh())
        return drawn[-1]
    return drawn[index % _DRAWN]


def _distinct_key(fd: FieldDescriptor, index: int) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return f"k{index}"
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return bool(index % 2)
    return index


def _overlay(pair: tuple[Any, Any]) -> Any:
    """The harvested message with the built one's set fields on top."""
    base, top = pair
    merged = type(base)()
    merged.CopyFrom(base)
    for fd, _ in top.ListFields():
        merged.ClearField(fd.name)
    merged.MergeFrom(top)
    return merged


def _retoken(token: str, position: list[Any]) -> str:
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        body = {"q": ""}
    if not isinstance(body, dict):
        body = {"q": ""}
    if isinstance(body.get("p"), list) and body["p"] and position:
        # Keep the shape sometimes: replace the parts in place.
        old = list(body["p"])
        for index, part in enumerate(position[: len(old)]):
            old[index] = part
        position = old if len(position) <= len(old) else position
    raw = json.dumps({"p": position, "q": body.get("q", "")}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


@st.composite
def _wire_field(draw: st.DrawFn) -> bytes:
    number = draw(st.one_of(st.integers(1, 20), st.sampled_from([0, 2**29 - 1, 19_000])))
    wire_type = draw(st.integers(0, 7))
    tag = _varint((number << 3) | wire_type)
    if wire_type == 0:
        body = _varint(draw(st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))))
    elif wire_type == 1:
        body = draw(st.binary(min_size=8, max_size=8))
    elif wire_type == 5:
        body = draw(st.binary(min_size=4, max_size=4))
    elif wire_type == 2:
        payload = draw(
            st.one_of(
                st.binary(max_size=24),
                st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
                st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x00"]),
            )
        )
        length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32)))
        body = _varint(length) + payload
    else:  # groups and the unused wire types 6 and 7
        body = b""
    return tag + body


def _nested_bytes(pair: tuple[int, int]) -> bytes:
    """Length-delimited field ``number`` inside itself ``levels`` times: deeper than any
    decoder's recursion limit when ``levels`` is large."""
    number, levels = pair
    data = b""
    for _ in range(levels):
        data = _varint((number << 3) | 2) + _varint(len(data)) + data
    return data


def raw_bytes() -> st.SearchStrategy[bytes]:
    return _RAW_BYTES


def _make_raw_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.tuples(st.integers(1, 12), st.sampled_from([64, 99, 100, 101, 200, 1000])).map(
            _nested_bytes
        ),
        st.binary(max_size=64),
        st.lists(_wire_field(), min_size=1, max_size=6).map(b"".join),
        st.sampled_from([b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x0a\x05ab"]),
    )


_RAW_BYTES = _make_raw_bytes()


def _mutation() -> st.SearchStrategy[tuple[str, int, bytes]]:
    return st.tuples(
        st.sampled_from(["flip", "insert", "delete", "overwrite", "duplicate", "truncate"]),
        st.integers(0, 1 << 12),
        st.binary(min_size=1, max_size=6),
    )


def _apply(data: bytes, mutations: Sequence[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, at, noise in mutations:
        at = at % (len(buf) + 1)
        if op == "flip" and buf:
            index = at % len(buf)
            buf[index] ^= 1 << (noise[0] % 8)
        elif op == "insert":
            buf[at:at] = noise
        elif op == "delete":
            del buf[at : at + 1 + noise[0] % 8]
        elif op == "overwrite":
            buf[at : at + len(noise)] = noise
        elif op == "duplicate":
            buf[at:at] = buf[at : at + 1 + noise[0] % 16]
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


# ---- minimizing a fault ----------------------------------------------------------------------


async def minimize(
    rpc: Rpc,
    data: bytes,
    still_fails: Callable[[bytes], Awaitable[bool]],
    budget: int = 300,
) -> bytes:
    """A smaller request that still fails: set fields cleared one by one (when the bytes
    decode), then byte ranges removed (delta debugging), within ``budget`` calls."""
    tries = 0

    async def check(candidate: bytes) -> bool:
        nonlocal tries
        tries += 1
        return await still_fails(candidate)

    cls = rpc.request_class()
    try:
        msg = cls.FromString(data)
    except message.DecodeError:
        msg = None
    if msg is not None and msg.SerializeToString() == data:
        for fd, _ in msg.ListFields():
            if tries >= budget:
                break
            smaller = cls()
            smaller.CopyFrom(msg)
            smaller.ClearField(fd.name)
            if await check(smaller.SerializeToString()):
                msg = smaller
        # Then shorten each string or bytes value that is left (nested ones too).
        for path in _text_paths(msg):
            value = _get_path(msg, path)
            chunk = max(1, len(value) // 2)
            while chunk >= 1 and value and tries < budget:
                start, shrunk = 0, False
                while start < len(value) and tries < budget:
                    candidate = cls()
                    candidate.CopyFrom(msg)
                    shorter = value[:start] + value[start + chunk :]
                    _set_path(candidate, path, shorter)
                    if await check(candidate.SerializeToString()):
                        msg, value, shrunk = candidate, shorter, True
                    else:
                        start += chunk
                if not shrunk:
                    chunk //= 2
        data = msg.SerializeToString()
        return data
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and tries < budget:
        start, shrunk = 0, False
        while start < len(data) and tries < budget:
            candidate = data[:start] + data[start + chunk :]
            if await check(candidate):
                data, shrunk = candidate, True
            else:
                start += chunk
        if not shrunk:
            chunk //= 2
    return data


def _text_paths(msg: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to the set string and bytes fields of ``msg`` and its singular submessages."""
    paths: list[tuple[str, ...]] = []
    for fd, value in msg.ListFields():
        if fd.is_repeated:
            continue
        if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            paths.append((*prefix, fd.name))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            paths.extend(_text_paths(value, (*prefix, fd.name)))
    return paths


def _get_path(msg: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        msg = getattr(msg, name)
    return msg


def _set_path(msg: Any, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        msg = getattr(msg, name)
    setattr(msg, path[-1], value)
