"""The documentation stays true to the repository: every relative link resolves to a file inside it, and the flag
tables in README.md list exactly the options of `python -m serving` and `python -m serving.batch`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "serving" / "default_model" / "README.md", ROOT / "configs" / "models" / "SOURCES.md",
               *(ROOT / "docs").rglob("*.md")])
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HTML_LINK = re.compile(r"(?:href|src)=\"([^\"]+)\"")


def links(markdown: str) -> list[str]:
    """Link targets of a markdown text, outside code blocks and code spans."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    return [m.group(1) for rx in (_INLINE_LINK, _REF_LINK, _HTML_LINK) for m in rx.finditer(text)]


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None or target.startswith("#")


def broken(source: Path, target: str) -> str | None:
    """Why a relative link from `source` does not resolve to a file or folder inside the repository, or None."""
    path = target.split("#", 1)[0].split("?", 1)[0]
    if path.startswith("/"):
        return "absolute path"
    resolved = (source.parent / path).resolve()
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    return None


def _markdown_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text()


def test_link_checker_sees_links():
    text = "[a](docs/x.md) ![b](img.png \"t\") `[c](skip.md)`\n```\n[d](skip.md)\n```\n[e]: ref.md\n<a href=\"h.md\">"
    assert links(text) == ["docs/x.md", "img.png", "ref.md", "h.md"]
    assert broken(README, "../outside.md") == "points outside the repository"
    assert broken(README, "docs/design.md#state") is None


@pytest.mark.parametrize("path", DOCS + NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    bad = [(t, why) for t in links(_markdown_of(path)) if not is_external(t) and (why := broken(path, t))]
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


def test_readme_links_the_design_document():
    assert "(docs/design.md)" in README.read_text()


# ------------------------------------------------------------------------------------------------------------
# Flag tables
# ------------------------------------------------------------------------------------------------------------


def documented_flags(markdown: str, heading: str) -> set[str]:
    """Option strings in the first column of the table under the heading that contains `heading`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    flags: set[str] = set()
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            first = line.split("|")[1]
            flags |= set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", first))
    return flags


def parser_flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


@pytest.mark.parametrize("module,heading", [("serving.__main__", "`python -m serving` flags"),
                                            ("serving.batch", "`python -m serving.batch` flags")])
def test_readme_flag_table_matches_the_parser(module, heading):
    parser = __import__(module, fromlist=["build_parser"]).build_parser()
    documented, actual = documented_flags(README.read_text(), heading), parser_flags(parser)
    assert documented, f"no flag table under a heading with {heading!r}"
    assert documented - actual == set(), f"README documents flags {module} does not have"
    assert actual - documented == set(), f"flags of {module} missing from README's table"
