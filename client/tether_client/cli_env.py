"""gRPC core logging for the ``tether`` command: off unless ``-vv``.

gRPC reads ``GRPC_VERBOSITY`` and ``GRPC_TRACE`` once, when it is imported, so
:func:`set_grpc_logging` runs first thing in the entry module, before anything imports
grpc. The settings found in the environment before (none, usually) are what a command run
by ``tether lease run`` or ``tether saga step`` gets (:func:`child_environment`): the
command's own gRPC logging is not ours to silence.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

GRPC_VARIABLES = ("GRPC_VERBOSITY", "GRPC_TRACE")
# -vv: gRPC's own debug lines and what it does to connect (connectivity, TLS handshakes).
VERBOSE_TRACE = "connectivity_state,handshaker"

_original: dict[str, str | None] = {}
_VERBOSE = re.compile(r"-v+")


def verbosity(argv: Sequence[str]) -> int:
    """How many ``-v`` the command line has (``-vv``, ``-v -v``, ``--verbose``), up to
    ``--`` (what follows is a command's own arguments)."""
    count = 0
    for argument in argv:
        if argument == "--":
            break
        if argument == "--verbose":
            count += 1
        elif _VERBOSE.fullmatch(argument):
            count += len(argument) - 1
    return count


def set_grpc_logging(argv: Sequence[str]) -> None:
    """gRPC core logs nothing (not even its handshake errors: the command says what went
    wrong itself) unless ``-vv``; settings already in the environment win.

    Only before grpc is imported, when it takes effect: a program that imports the CLI
    (a test calling ``main``) keeps its environment as it is."""
    if "grpc" in sys.modules:
        return
    for name in GRPC_VARIABLES:
        _original.setdefault(name, os.environ.get(name))
    if verbosity(argv) >= 2:
        os.environ.setdefault("GRPC_VERBOSITY", "DEBUG")
        os.environ.setdefault("GRPC_TRACE", VERBOSE_TRACE)
    else:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment as it was before :func:`set_grpc_logging`, plus ``extra``."""
    env = dict(os.environ)
    for name, value in _original.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update(extra or {})
    return env
