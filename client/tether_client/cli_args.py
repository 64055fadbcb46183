"""The ``tether`` command's argument parser and the argument types its commands share.

:class:`Parser` is ``argparse.ArgumentParser`` with three changes a person notices:

- a mistyped option is named, with the closest real one: ``unrecognized option '--tll'
  (did you mean --ttl?)``, and that wins over whatever else is wrong (a required ``--ttl``
  is missing because it was mistyped);
- a mistyped command likewise: ``unknown command 'aquire' (did you mean acquire?)``;
- a value that looks like a negative number or duration (``--ttl -5s``) is a value, so its
  type says what is wrong with it, instead of "expected one argument".

Every parser added under it (``add_subparsers``) is a :class:`Parser` too.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from tether_client.convert import parse_duration, parse_int

# ``-5``, ``-0.5``, ``-.5``, ``-5s``, ``-1m30s``, ``-1e400``, ``-inf``: values, not options.
_NEGATIVE = re.compile(r"^-((\d+\.?\d*|\.\d+)([a-z]+(\d+\.?\d*|\.\d+)?)*|inf|infinity|nan)$", re.I)
_INVALID_CHOICE = re.compile(r"^argument (?P<arg>[^:]+): invalid choice: '(?P<given>[^']*)'")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE
        self._arguments: list[str] = []
        #: The attribute that gets what follows ``--`` (a command to run), if any.
        self.trailing_command: str | None = None

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        arguments = list(sys.argv[1:] if args is None else args)
        command: list[str] = []
        if self.trailing_command is not None and "--" in arguments:
            split = arguments.index("--")
            arguments, command = arguments[:split], arguments[split + 1 :]
        self._arguments = arguments
        parsed, extras = super().parse_known_args(self._arguments, namespace)
        if self.trailing_command is not None:
            setattr(parsed, self.trailing_command, command)
        unknown = self._unknown_option(extras)
        if unknown is not None:
            self._unrecognized(unknown)
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        # An unknown option explains most other errors (a "missing" --ttl typed --tll).
        unknown = self._unknown_option(self._arguments)
        if unknown is not None:
            self._unrecognized(unknown)
        match = _INVALID_CHOICE.match(message)
        commands = self._commands()
        if match and commands:
            given = match.group("given")
            message = f"unknown command {given!r}"
            close = difflib.get_close_matches(given, list(commands), n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
            else:
                message += f" (choose from {', '.join(commands)})"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def _unrecognized(self, option: str) -> NoReturn:
        name = option.split("=", 1)[0]
        message = f"unrecognized option {name!r}"
        candidates = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]}?)"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _unknown_option(self, arguments: Sequence[str]) -> str | None:
        """The first argument that is an option this parser does not know (``None`` if
        none). Arguments after ``--`` or after a command name belong to someone else."""
        commands = self._commands()
        for argument in arguments:
            if argument == "--" or argument in commands:
                return None
            if self._is_unknown_option(argument):
                return argument
        return None

    def _is_unknown_option(self, argument: str) -> bool:
        if len(argument) < 2 or argument[0] not in self.prefix_chars or " " in argument:
            return False
        if self._negative_number_matcher.match(argument):
            return False
        name = argument.split("=", 1)[0]
        known = self._option_string_actions
        if name in known:
            return False
        if argument.startswith("--"):
            # An abbreviation (--lab for --label): argparse takes it, or says it is ambiguous.
            return not (self.allow_abbrev and any(o.startswith(name) for o in known))
        return argument[:2] not in known  # -vv, -lapp=web


# --- argument types -----------------------------------------------------------------------


def duration(text: str) -> float:
    """``30s``, ``500ms``, ``2m``, ``1h``, ``1m30s`` or seconds; never negative."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r}")
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    # Bounded by what an int64 field holds: a bigger number is a usage error, not an
    # overflow when the request is built.
    try:
        return parse_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        return parse_int(text, minimum=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int32(what: str, *, minimum: int = 0) -> Callable[[str], int]:
    """A whole number that fits an int32 field (step indexes, attempts)."""

    def parse(text: str) -> int:
        try:
            return parse_int(text, minimum=minimum, maximum=2**31 - 1)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    return parse


def pair(what: str) -> Callable[[str], tuple[str, str]]:
    """An argparse type for ``KEY=VALUE`` (``what``: "a label", "an attribute")."""

    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{what} is KEY=VALUE, not {text!r}")
        return key, value

    return parse


label = pair("a label")
attribute = pair("an attribute")


def _json_text(text: str) -> str:
    """``@FILE`` reads FILE, ``@-`` reads stdin; anything else is the JSON itself."""
    if not text.startswith("@"):
        return text
    name = text[1:]
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise argparse.ArgumentTypeError(f"{reason}: {name}") from None


def json_value(text: str) -> Any:
    """Any JSON value: ``'{"a": 1}'``, ``'"web:1"'``, ``42``; ``@FILE`` or ``@-`` to read it."""
    source = _json_text(text)
    try:
        return json.loads(source)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {_short(source)}") from None


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (``'{"app": "web"}'``); ``@FILE`` or ``@-`` to read it."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {_short(text)}")
    return value


def _short(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def time_or_duration(text: str) -> datetime:
    """An RFC 3339 time (``2030-01-01T12:00:00Z``) or a duration from now (``2h``)."""
    try:
        return datetime.now(UTC) + timedelta(seconds=positive_duration(text))
    except argparse.ArgumentTypeError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time or a duration: {text!r} (e.g. 2030-01-01T12:00:00Z, or 2h from now)"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time zone (e.g. a trailing Z): {text!r}")
    return when
