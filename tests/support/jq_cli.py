"""``jq [-r] [-c] FILTER``: the jq command the grpcurl cookbook's pipelines call, run by
libjq through the pinned ``jq`` wheel, so ``make test`` needs no system package.

Reads a stream of JSON values on stdin and prints each result as jq does: indented by
default, on one line with ``-c``, strings bare with ``-r``.
"""

from __future__ import annotations

import json
import sys

import jq


def main(argv: list[str]) -> int:
    raw = compact = False
    program: list[str] = []
    for arg in argv:
        if arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= {"r", "c"}:
            raw = raw or "r" in arg
            compact = compact or "c" in arg
        else:
            program.append(arg)
    if len(program) != 1:
        print("usage: jq [-r] [-c] FILTER", file=sys.stderr)
        return 2
    for value in jq.compile(program[0]).input_text(sys.stdin.read()).all():
        if raw and isinstance(value, str):
            print(value)
        elif compact:
            print(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        else:
            print(json.dumps(value, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
