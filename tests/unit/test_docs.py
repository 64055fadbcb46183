"""The repository is self-contained: its documents link only to files it has, and nothing
in it points to a design document or a directory outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Words that name documents this repository once pointed to and does not have.
_OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|STYLE\.md|precedents/")
_TEXT_SUFFIXES = {".py", ".md", ".proto", ".yaml", ".toml", ".js", ".json"}
_TEXT_NAMES = {"Makefile", "Dockerfile", "run"}


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def test_markdown_links_resolve_inside_the_repository() -> None:
    broken = []
    for doc in _tracked("*.md"):
        for target in _LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in (path, *path.parents):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing in the repository:\n" + "\n".join(broken)


def _is_text_source(path: Path) -> bool:
    return path.suffix in _TEXT_SUFFIXES or path.name in _TEXT_NAMES


def test_nothing_points_outside_the_repository() -> None:
    this_file = Path(__file__).resolve()
    pointing = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _tracked()
        if _is_text_source(path) and path != this_file
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert not pointing, "files point outside the repository:\n" + "\n".join(pointing)


def test_the_contract_is_in_the_repository() -> None:
    for page in ("contract", "errors", "operations", "clients", "grpcurl"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"
    readme = (ROOT / "README.md").read_text()
    assert "docs/contract.md" in readme, "the README must lead to the contract"
