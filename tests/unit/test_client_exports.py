"""The package's public names: each resolves, and importing the package imports no grpc
(the ``tether`` command must set gRPC's logging variables before grpc reads them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tether_client
from tether_client import errors


def test_every_public_name_resolves() -> None:
    for name in tether_client.__all__:
        assert getattr(tether_client, name) is not None, name
    assert sorted(dir(tether_client)) == sorted(tether_client.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        tether_client.NoSuchThing  # noqa: B018


def test_root_errors_are_the_errors_modules() -> None:
    for name in tether_client.__all__:
        value = getattr(tether_client, name)
        if isinstance(value, type) and issubclass(value, errors.TetherError):
            assert getattr(errors, name) is value
            assert name in errors.__all__


def test_importing_the_package_imports_no_grpc() -> None:
    probe = (
        "import sys, tether_client, tether_client.cli_env; "
        "print('grpc' in sys.modules); "
        "from tether_client import TetherClient; print('grpc' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["False", "True"]
