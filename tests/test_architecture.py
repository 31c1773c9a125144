"""docs/design.md §7: one-way data flow. Stage two never imports image code, the store never imports timm,
only the CLI imports typer/rich, and only the query path does attention math."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vqt_cache"


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module",
    ["vqt_cache.training", "vqt_cache.evaluation", "vqt_cache.sweep", "vqt_cache.report", "vqt_cache.compress"],
)
def test_stage_two_does_not_import_image_code(module):
    loaded = loaded_after_import(module)
    assert "vqt_cache.datasets" not in loaded and "vqt_cache.extraction" not in loaded


def test_store_does_not_import_timm():
    assert "timm" not in loaded_after_import("vqt_cache.store")


@pytest.mark.parametrize("module", ["vqt_cache.recipe", "vqt_cache.formats"])
def test_the_defaults_import_no_torch(module):
    """The CLI shows them in --help, and a notebook reads them, without loading torch."""
    loaded = loaded_after_import(module)
    assert "torch" not in loaded and "numpy" not in loaded


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_cli_imports_typer_and_rich():
    for path in PACKAGE.glob("*.py"):
        if path.name != "cli.py":
            assert not {"typer", "rich"} & _imports(path), path.name


def test_only_the_query_path_does_attention_math():
    for path in PACKAGE.glob("*.py"):
        if path.name != "query.py":
            text = path.read_text()
            assert "softmax(dim=-1)" not in text and "scaled_dot_product_attention" not in text, path.name


def test_every_file_outside_a_store_is_written_through_files_py():
    """Whole or absent: only vqt_cache/files.py writes files (temporary file, fsync, rename), lock files aside."""
    import re

    # a figure saved into an in-memory buffer (`savefig(buffer`) is fine: the bytes then go through files.py
    writes = re.compile(r"\.write_text\(|\.write_bytes\(|\bsave_file\(|torch\.save\(|\.savefig\([^b]|open\([^)]*\"w")
    for path in PACKAGE.glob("*.py"):
        if path.name != "files.py":
            found = [line for line in path.read_text().splitlines() if writes.search(line) and ".lock" not in line]
            assert not found, (path.name, found)
