"""docs/theory.md is where code and docs point for the theory: its section anchors must exist and every link to
one must resolve.

Anchors are explicit HTML ids, ``<a id="NAME"></a>`` on the line before a heading, so renaming a heading cannot
break a link. A link is ``docs/theory.md#NAME`` (code, README, tests), ``theory.md#NAME`` (relative, from
docs/) or ``#NAME`` inside theory.md itself.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
SCANNED = ["trl_kl", "docs", "README.md", "tests", "benchmarks", "tools", "recipes"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".sh", ".cfg", ".ini"}

REQUIRED_ANCHORS = [
    "estimators",
    "placement",
    "sequence-kl",
    "off-policy",
    "sampler-mismatch",
    "clip-std",
    "full-kl",
    "adaptive-kl",
    "dpo",
    "appendix-d",
    "peers",
    "references",
]

ANCHOR = re.compile(r'<a id="([^"]+)"></a>')
LINK = re.compile(r"(?<![\w/.-])(?:docs/)?theory\.md#([\w-]+)")
IN_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")


def defined_anchors() -> list[str]:
    return ANCHOR.findall(THEORY.read_text())


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES)
    return [p for p in files if p != Path(__file__).resolve()]  # this file's examples are not links


def theory_links() -> list[tuple[str, int, str]]:
    """(file, line, anchor) for every link to a theory.md anchor in the scanned files."""
    links = []
    for path in scanned_files():
        text = path.read_text(errors="replace")
        patterns = [LINK, IN_PAGE_LINK] if path == THEORY else [LINK]
        for pattern in patterns:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                links.append((str(path.relative_to(ROOT)), line, match.group(1)))
    return links


def test_link_pattern_finds_each_form():
    """The patterns must see every link form (else the resolution test below would pass vacuously)."""
    sample = "see docs/theory.md#placement, [x](theory.md#clip-std) and (docs/theory.md#sequence-kl)."
    assert LINK.findall(sample) == ["placement", "clip-std", "sequence-kl"]
    assert LINK.findall("mytheory.md#placement otherdocs/theory.md#x") == []
    assert IN_PAGE_LINK.findall("[a](#dpo) [b](other.md#x)") == ["dpo"]


def test_required_anchors_exist_once_before_a_heading():
    text = THEORY.read_text()
    anchors = defined_anchors()
    missing = [name for name in REQUIRED_ANCHORS if name not in anchors]
    assert not missing, f"docs/theory.md lacks the anchors {missing}"
    duplicated = sorted({name for name in anchors if anchors.count(name) > 1})
    assert not duplicated, f"docs/theory.md defines these anchors more than once: {duplicated}"
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = ANCHOR.fullmatch(line.strip())
        if match:
            following = lines[number + 1] if number + 1 < len(lines) else ""
            assert following.startswith("#"), f'<a id="{match.group(1)}"> (line {number + 1}) must precede a heading'


def test_every_theory_link_resolves():
    anchors = set(defined_anchors())
    links = theory_links()
    assert any(name == "docs/theory.md" for name, _, _ in links), "theory.md's own table of contents was not scanned"
    broken = [f"{name}:{line} -> #{anchor}" for name, line, anchor in links if anchor not in anchors]
    assert not broken, "links to anchors docs/theory.md does not define:\n" + "\n".join(broken)


OUTSIDE_REFERENCE = re.compile(r"NOTES *§|NOTES\.md|\.\./shared|shared/(?:paper|NOTES|DESIGN|TRL_NOTES)")
"""Pointers at private notes that users of the package never have: the theory lives in docs/theory.md."""


def test_no_reference_points_outside_the_repo():
    offenders = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "point these at docs/theory.md#<anchor> instead:\n" + "\n".join(offenders)
