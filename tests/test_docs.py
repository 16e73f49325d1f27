"""The documentation holds itself together: the README stays a first screen and a map,
docs/configuration.md is what the code generates, every relative link resolves to a file
and a heading, and every number of docs/results.md names the command that made it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# pages written beside this one; a link to them is checked once they exist
PENDING = {"docs/layerwise.md", "docs/structured.md", "docs/faults.md"}
README_MAX_LINES = 300


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def unfenced(text: str) -> str:
    """``text`` without its fenced code blocks (whose ``#`` lines are no headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """``text`` without code, fenced or inline, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    for line in unfenced(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n, name = 0, base
            while name in out:  # GitHub numbers repeated headings: name, name-1, ...
                n += 1
                name = f"{base}-{n}"
            out.add(name)
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``path`` whose file or heading does not exist."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        rel = dest.relative_to(root.resolve()).as_posix() if dest.is_relative_to(
            root.resolve()) else str(dest)
        if not dest.exists():
            if rel not in PENDING:
                bad.append(f"{target} (no file {rel})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {rel})")
    return bad


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f"README.md has {len(lines)} lines; move detail into a page of docs/"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files_and_headings(path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#its-part) [gone](docs/b.md) [typo](docs/a.md#its-prat)\n"
                    "`[not a link](nowhere.md)` [self](#nothing)\n"
                    "[pending](docs/faults.md)\n")
    assert broken_links(page, root=tmp_path) == [
        "docs/b.md (no file docs/b.md)",
        "docs/a.md#its-prat (no heading #its-prat in docs/a.md)",
        "#nothing (no heading #nothing in README.md)"]


def test_configuration_page_is_what_the_code_generates():
    config_doc = _load("config_doc")
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == config_doc.markdown(), \
        "docs/configuration.md is out of date: python benchmarks/config_doc.py"


def test_the_configuration_page_has_every_schema_key_and_component():
    from wfcore import config

    text = (ROOT / "docs" / "configuration.md").read_text()
    for section in ("model", "data", "train", "fisher", "safeguard", "structure", "batchnorm"):
        assert f"## `{section}`" in text
    assert "| `num_grads` | `int` | `1000` | ≥ 1 |" in text
    assert "`empirical`, `sampled`" in text  # a choice list of config.CHOICES
    for name in ("woodfisher", "kfac", "obs", "global", "gradual", "onnx"):
        assert f".name: {name}`" in text
    assert len(config.describe_options(config.FisherSection)) > 5


def results_sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- results:([\w.-]+) -->\n(.*?)<!-- /results:\1 -->", text,
                           re.S))


def test_every_results_section_names_its_date_commit_machine_and_command():
    text = (ROOT / "docs" / "results.md").read_text()
    sections = results_sections(text)
    assert sections, "docs/results.md has no sections"
    for name, body in sections.items():
        assert re.search(r"^\*\d{4}-\d{2}-\d{2}, commit \S+, .+\*", body, re.M), name
        commands = re.findall(r"^command: `(.+)`", body, re.M)
        assert commands and all(c.strip() for c in commands), f"{name}: no command line"
    outside = re.sub(r"<!-- results:([\w.-]+) -->\n.*?<!-- /results:\1 -->\n", "", text,
                     flags=re.S)
    assert not re.search(r"^\|", outside, re.M), "a table of docs/results.md outside a section"


def test_write_section_stamps_a_carried_table_and_refuses_half_its_facts(tmp_path):
    results_doc = _load("results_doc")
    path = tmp_path / "results.md"
    results_doc.write_section("t", "T", "| a |\n|---|\n| 1 |", command="python x.py",
                              path=path, date="2026-01-02", commit="abc1234", machine="2 cores")
    results_doc.write_section("u", "U", "| b |\n|---|\n| 2 |", path=path,
                              command=["python y.py --a", "python y.py --b"])
    sections = results_sections(path.read_text())
    assert "*2026-01-02, commit abc1234, 2 cores; carried over" in sections["t"]
    assert "command: `python x.py`" in sections["t"]
    assert re.findall(r"^command: `(.+)`", sections["u"], re.M) == ["python y.py --a",
                                                                     "python y.py --b"]
    with pytest.raises(ValueError, match="date, commit and machine together"):
        results_doc.write_section("v", "V", "| c |", path=path, date="2026-01-02")
