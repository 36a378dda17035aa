"""The README stays a five-minute read whose pointers work: short, no overlong lines, every relative link to a file
that exists, every `make` target it names defined in the Makefile, and the own-data commands that
tests/test_readme_own_data.py runs still there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_LINES = 150
MAX_WIDTH = 120

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def test_readme_is_short():
    assert len(readme_lines()) <= MAX_LINES, f"README.md has {len(readme_lines())} lines (at most {MAX_LINES})"


def test_readme_has_no_line_over_120_characters():
    long = [f"{i}: {len(line)} chars" for i, line in enumerate(readme_lines(), 1) if len(line) > MAX_WIDTH]
    assert not long, f"README.md lines over {MAX_WIDTH} characters: {long}"


def test_every_relative_link_in_the_readme_points_to_an_existing_file():
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "README.md has no relative links (the docs pages should be linked)"
    missing = [t for t in relative if not (README.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {t.split("#", 1)[0] for t in LINK.findall(README.read_text(encoding="utf-8"))}
    unlinked = [f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_every_make_target_the_readme_names_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    defined = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.MULTILINE))
    named = set(re.findall(r"(?:^|`|\s)make ([a-z][\w-]*)", README.read_text(encoding="utf-8")))
    assert {"run", "test"} <= named
    assert named <= defined, f"README names make targets the Makefile lacks: {sorted(named - defined)}"


def test_the_own_data_commands_the_slow_test_runs_are_there():
    """tests/test_readme_own_data.py runs the `.venv/bin/finetune` lines carrying these comments, as written."""
    for comment in ("validate any folder", "your own data"):
        lines = [line for line in readme_lines() if comment in line and line.startswith(".venv/bin/finetune")]
        assert lines, f"README.md has no finetune command with the comment {comment!r}"
        assert "/path/to/images" in lines[0], lines[0]
