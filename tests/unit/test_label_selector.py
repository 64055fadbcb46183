"""Kubernetes label selectors: parsing, matching, and refusals naming the field."""

from __future__ import annotations

import pytest

from tether_server.domain.errors import InvalidField
from tether_server.domain.label_selector import Op, Requirement, parse


def test_every_operator_parses() -> None:
    selector = parse("app=agent, tier!=cache,env in (a, b),zone notin (x),gpu,!legacy,v==1")
    assert selector.requirements == (
        Requirement("app", Op.EQUALS, ("agent",)),
        Requirement("tier", Op.NOT_EQUALS, ("cache",)),
        Requirement("env", Op.IN, ("a", "b")),
        Requirement("zone", Op.NOT_IN, ("x",)),
        Requirement("gpu", Op.EXISTS),
        Requirement("legacy", Op.NOT_EXISTS),
        Requirement("v", Op.EQUALS, ("1",)),
    )


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("", {}, True),
        ("app=agent", {"app": "agent"}, True),
        ("app=agent", {}, False),
        ("app!=agent", {}, True),
        ("app!=agent", {"app": "agent"}, False),
        ("env in (a,b)", {"env": "b"}, True),
        ("env notin (a,b)", {"env": "c"}, True),
        ("env notin (a,b)", {}, True),
        ("gpu", {"gpu": ""}, True),
        ("!gpu", {"gpu": ""}, False),
        ("example.com/team=x,app", {"example.com/team": "x", "app": "y"}, True),
    ],
)
def test_matching_follows_kubernetes(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert parse(selector).matches(labels) is matches


@pytest.mark.parametrize(
    "selector", ["app in (a", "app in ()", "=x", "!app=x", "a b", "app=x,", "bad key=1", "a=(b)"]
)
def test_malformed_selectors_name_the_field(selector: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse(selector)
    assert caught.value.field_name == "label_selector"
