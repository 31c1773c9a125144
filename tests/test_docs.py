"""The project's own docs stay true to the code that cites them: every `docs/NAME.md §N` names a file that exists
and a section it has, and no citation leaves out the docs/ folder."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED_IN = ["vqt_cache/*.py", "bench/*.py", "tests/*.py", "pipelines/*.toml", "docs/*.md", "README.md", "Makefile"]
CITATION = re.compile(r"(\S*?)\b([a-z_]+\.md)(?: §(\d+))?")


def citations() -> list[tuple[str, str, str, str | None]]:
    found = []
    for pattern in CITED_IN:
        for path in sorted(REPO.glob(pattern)):
            if path.name == "test_docs.py":  # this file names the docs in its own checks
                continue
            for prefix, name, section in CITATION.findall(path.read_text()):
                if name in ("method.md", "design.md"):
                    found.append((path.relative_to(REPO).as_posix(), prefix, name, section or None))
    return found


def test_every_citation_names_a_doc_and_a_section_that_exist():
    found = citations()
    assert len(found) >= 20  # the package's modules cite the docs throughout
    for where, prefix, name, section in found:
        assert prefix.endswith("docs/"), f"{where} cites {name} without its folder: write docs/{name}"
        doc = REPO / "docs" / name
        assert doc.is_file(), f"{where} cites {doc}, which does not exist"
        if section:
            headings = re.findall(r"^## (\d+)\. ", doc.read_text(), flags=re.M)
            assert section in headings, f"{where} cites docs/{name} §{section}, which has no such section"


def _check_tables(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, "-m", "bench.tables", "--check"], cwd=root, env=env, capture_output=True, text=True
    )


def test_the_benchmark_figures_are_those_of_bench_results(tmp_path):
    """Every benchmark table of the docs is what `python -m bench.tables` makes of bench/results.json."""
    page = (REPO / "docs" / "benchmarks.md").read_text()
    assert page.count("<!-- bench:") >= 10
    done = _check_tables(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    # a figure edited by hand is caught
    shutil.copytree(REPO / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text(
        page.replace("| **hidden int8 (the default)** | **1.88** |", "| **hidden int8 (the default)** | **1.5** |")
    )
    done = _check_tables(tmp_path)
    assert done.returncode == 1 and "sizing" in done.stdout


def test_the_readme_is_read_in_ten_minutes():
    """The README stays a first page (what it is, first commands, usage, the API, where to read more): at most 250
    lines, every doc it points to exists, and the long matter lives in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for name in re.findall(r"docs/([a-z_]+\.md)", readme):
        assert (REPO / "docs" / name).is_file(), f"README.md points to docs/{name}, which does not exist"
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings == ["First commands", "Usage", "Python API", "Where to read more"]


def test_the_pipeline_page_lists_every_key_and_its_example_loads(tmp_path):
    import dataclasses

    from vqt_cache.sweep import DatasetEntry, Grid, Pipeline, Protocol, load_pipeline

    page = (REPO / "docs" / "pipelines.md").read_text()
    sections = {
        "## Top level": Pipeline,
        "## `[protocol]`": Protocol,
        "## `[grid]`": Grid,
        "## `[[datasets]]`": DatasetEntry,
    }
    for heading, schema in sections.items():
        body = page.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` \|", body, re.M)
        assert sorted(documented) == sorted(f.name for f in dataclasses.fields(schema)), heading
    example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "p.toml").write_text(example)
    loaded = load_pipeline(tmp_path / "p.toml")
    assert loaded.protocol.select_eval == "val" and loaded.datasets[0].queries == (1, 10)
