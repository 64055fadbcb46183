"""SQL statements written once, in PostgreSQL's form, and derived for SQLite at import.

Hot statements are plain prepared SQL: asyncpg prepares each text once per connection and
SQLite's statement cache does the same, so no query is compiled per call.

The PostgreSQL text is the source. The SQLite text is derived mechanically:
``$n`` placeholders become ``?n``, ``GREATEST(`` becomes SQLite's scalar ``MAX(``, row
locks are dropped (a SQLite write transaction already holds the whole database), casts
(``::int``) go, and ``= ANY($n)`` over an array becomes
``IN (SELECT value FROM json_each(?n))`` (the SQLite transaction passes lists as JSON).
Where the two must differ beyond that, a statement gives its SQLite text explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANY = re.compile(r"= ANY\(\$(\d+)(?:::\w+\[\])?\)")
_PLACEHOLDER = re.compile(r"\$(\d+)")
_LOCKS = re.compile(r"\s+FOR (?:UPDATE|SHARE)(?: OF \w+)?(?: SKIP LOCKED)?")
_CAST = re.compile(r"::\w+(?:\[\])?")
_WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")


@dataclass(frozen=True)
class Sql:
    pg: str
    sqlite: str
    # Whether running it may change rows: a unit of work that raised after such a
    # statement must be rolled back before its batch can commit.
    writes: bool


def sql(text: str, *, sqlite: str | None = None) -> Sql:
    pg = " ".join(text.split())
    if sqlite is None:
        lite = _ANY.sub(lambda m: f"IN (SELECT value FROM json_each(${m.group(1)}))", pg)
        lite = _CAST.sub("", _LOCKS.sub("", lite)).replace("GREATEST(", "MAX(")
    else:
        lite = " ".join(sqlite.split())
    lite = _PLACEHOLDER.sub(r"?\1", lite)
    return Sql(pg=pg, sqlite=lite, writes=pg.split(" ", 1)[0].upper() in _WRITES)
