"""The README for users: short, its two first commands what CI runs, its layout table true to the
package, and every link it and the docs pages make pointing at something that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PACKAGE = ROOT / "src" / "meteor"


def _layout_table() -> list[str]:
    """The entries of the README's layout table (its first column), as names."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## How the code is laid out"):]
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += [name.rstrip("/") for name in re.findall(r"`([^`]+)`", line.split("|")[1])]
    return names


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_layout_table_lists_every_package_and_module_and_nothing_else():
    listed = set(_layout_table())
    present = {path.name.removesuffix(".py") if path.is_file() else path.name for path in PACKAGE.iterdir()
               if path.name != "__pycache__" and (path.is_dir() or path.suffix == ".py")}
    assert {name.removesuffix(".py") for name in listed} == present
    assert len([p for p in PACKAGE.iterdir() if p.suffix == ".py"]) <= 6     # the rest are folders


def test_every_relative_link_of_the_readme_and_the_docs_exists():
    missing = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} → {target}")
    assert missing == []
