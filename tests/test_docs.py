"""README stays a few screens long and every page of docs/ is one link away from it; no link in either points
nowhere (a moved section, a renamed file or heading)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 330  # "about 300": deep material belongs in docs/
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (fragment and fragment not in anchors(resolved)):
            broken.append(target)
    return broken


def test_readme_is_a_few_screens_long() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move deep material to a page of docs/"


def test_every_page_of_docs_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert DOCS and [page.name for page in DOCS if page.resolve() not in linked] == []


def test_no_link_points_nowhere() -> None:
    assert {str(page.relative_to(ROOT)): broken_links(page) for page in [README, *DOCS] if broken_links(page)} == {}


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n")
    page.write_text("[ok](other.md#a-part) [gone](missing.md) [no heading](other.md#nothing) [here](#top)\n# Top\n")
    assert broken_links(page) == ["missing.md", "other.md#nothing"]
