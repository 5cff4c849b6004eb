"""Every link in README.md and docs/**/*.md resolves (issue 30, item 3).

A relative markdown link or image (``[text](path)``, ``![alt](path)``) must name a file or folder that exists,
relative to the page it is on; a ``#anchor`` (on its own, or after a ``.md`` path) must match a heading of
that page, slugged the way GitHub does (lowercase; punctuation other than ``-`` and ``_`` dropped; each space
a ``-``; a repeated heading gets ``-1``, ``-2``, ...). Links inside code blocks and code spans are text, not
links; ``http(s):`` and ``mailto:`` links are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, newlines kept: offsets and line numbers stay those of the page."""
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The page without its fenced code blocks and code spans (same length, same lines)."""
    return _CODE_SPAN.sub(_blank, _FENCE.sub(_blank, text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: link targets and markup dropped, lowercase, punctuation other
    than - and _ removed, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page defines: its headings' slugs (repeats numbered as GitHub does) and <a name/id>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    without_fences = _FENCE.sub(_blank, text)
    for match in _HEADING.finditer(without_fences):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(_HTML_ANCHOR.findall(text))
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link and image outside code."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(body)]


def broken_links(page: Path) -> list[str]:
    """One line per link of ``page`` that does not resolve: 'page:line: target: why'."""
    text = page.read_text(encoding="utf-8")
    problems = []
    try:
        name = page.relative_to(ROOT)
    except ValueError:
        name = page
    for line, target in links(text):
        if not target or _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{name}:{line}: ({target})"
        if path_part:
            resolved = (page.parent / path_part).resolve()
            if not resolved.exists():
                problems.append(f"{where}: no such file {path_part}")
                continue
        else:
            resolved = page
        if (anchor and resolved.suffix == ".md" and resolved.is_file()
                and anchor not in anchors(resolved.read_text(encoding="utf-8"))):
            problems.append(f"{where}: {resolved.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_the_page_resolves(page):
    assert broken_links(page) == []


def test_the_pages_are_found_and_hold_links():
    """The check sees the guides and the benchmark pages, and finds their links (a regex that found
    nothing would pass every page)."""
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "docs/results.md", "docs/daily.md", "docs/bench/quality.md"} <= names
    assert sum(len(links(p.read_text())) for p in PAGES) > 100


def test_every_benchmark_artifact_is_under_docs_bench_and_linked_from_the_results_page():
    """Benchmark artifacts (JSON, tables, plots) live in docs/bench/, none at docs/ top, and docs/results.md
    links each of them: one page leads to every result."""
    top = sorted(p.name for p in (ROOT / "docs").iterdir() if p.is_file() and p.suffix != ".md")
    assert top == [], f"artifacts at docs/ top (move them to docs/bench/): {top}"
    results = ROOT / "docs" / "results.md"
    linked = {(results.parent / target.partition("#")[0]).resolve() for _, target in links(results.read_text())}
    artifacts = sorted(p for p in (ROOT / "docs" / "bench").iterdir() if p.is_file())
    assert [str(p.relative_to(ROOT)) for p in artifacts if p.resolve() not in linked] == []


def test_the_checker_reports_a_missing_file_a_missing_anchor_and_a_broken_image(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Step 2: the `store` (k = 8)\n\n## Notes\n\n## Notes\n")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine too](other.md#step-2-the-store-k--8) [repeat](other.md#notes-1)"
        " [self](#page) ![plot](plot.png) [web](https://example.com/x.md#nowhere)\n"
        "[gone](missing.md) and ![gone too](missing.png)\n"
        "[bad anchor](other.md#step-3)\n"
        "[bad self anchor](#nowhere)\n"
        "`[in code](missing2.md)`\n"
        "```\n[in a block](missing3.md)\n```\n")
    problems = broken_links(page)
    assert [p.split(": (")[0].rsplit(":", 1)[1] for p in problems] == ["4", "4", "5", "6"], problems
    assert "no such file missing.md" in problems[0] and "no such file missing.png" in problems[1]
    assert "other.md has no heading with the anchor #step-3" in problems[2]
    assert "page.md has no heading with the anchor #nowhere" in problems[3]


def test_slugs_follow_github():
    assert slug("Imported logs (`bahe-data import`)") == "imported-logs-bahe-data-import"
    assert slug("Gemma-3-270M and its licence") == "gemma-3-270m-and-its-licence"
    assert slug("The daily loop: `bahe-daily`, [guide](x.md)") == "the-daily-loop-bahe-daily-guide"
    assert slug("k = 8, M_20") == "k--8-m_20"
