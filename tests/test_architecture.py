"""docs/design.md §7: one-way data flow. Stage two never imports image code, the store never imports timm,
only the CLI imports typer (and rich, beside progress.py), and only the query path does attention math."""

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


def _import_time_names(tree: ast.AST, package: str) -> set[str]:
    """The modules a module imports when it is imported: its statements outside functions (an import inside a
    function runs only when called) and outside `if TYPE_CHECKING:`."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                names |= {".".join(parts[: i + 1]) for i in range(len(parts))}
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            names |= {".".join(parts[: i + 1]) for i in range(len(parts))}  # a submodule imports its packages
            if node.module.split(".")[0] == package:  # from vqt_cache import recipe: the submodule
                names |= {f"{node.module}.{a.name}" for a in node.names if _source(f"{node.module}.{a.name}")}
        names |= _import_time_names(node, package)
    return names


def imported_with(module: str) -> set[str]:
    """Every module name that importing `module` imports: the closure of import-time imports over this package's
    modules (third-party packages are leaves: none of them imports this package or timm)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source(name)
        if path is not None:
            todo += sorted(_import_time_names(ast.parse(path.read_text()), "vqt_cache") - seen)
    return seen


def _source(name: str) -> Path | None:
    """The file of one of this package's modules (a subpackage's __init__.py), or None."""
    if name.split(".")[0] != "vqt_cache":
        return None
    base = PACKAGE.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@pytest.mark.parametrize(
    "module",
    ["vqt_cache.training", "vqt_cache.evaluation", "vqt_cache.sweep", "vqt_cache.report", "vqt_cache.compress"],
)
def test_stage_two_does_not_import_image_code(module):
    imported = imported_with(module)
    assert "vqt_cache.store" in imported  # the closure is followed: stage two reads stores
    assert "vqt_cache.datasets" not in imported and "vqt_cache.extraction" not in imported


def test_store_does_not_import_timm_or_torch():
    """`vqt-cache info`, `plan` and `verify` start in a second, not the five that importing torch takes."""
    imported = imported_with("vqt_cache.store")
    assert "zarr" in imported and "timm" not in imported and "torch" not in imported


def test_the_closure_sees_what_python_loads():
    """The static closure agrees with a real import of the most connected stage-two module."""
    package = {m for m in loaded_after_import("vqt_cache.sweep") if m.startswith("vqt_cache")}
    assert package == {m for m in imported_with("vqt_cache.sweep") if m.startswith("vqt_cache")}


@pytest.mark.parametrize(
    "module",
    ["vqt_cache.recipe", "vqt_cache.formats", "vqt_cache.dataset_catalog", "vqt_cache.methods", "vqt_cache.config"],
)
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
    for path in PACKAGE.rglob("*.py"):
        if path.name != "cli.py":
            allowed = {"rich"} if path.name == "progress.py" else set()  # the progress display the API shows too
            assert not ({"typer", "rich"} - allowed) & _imports(path), path.name


def test_only_the_query_path_does_attention_math():
    """Attention over the frozen blocks is query.py's alone; the attentive probe's own learned cross-attention
    block (methods/attentive.py, V-JEPA's) is the one other attention, tested cached against live."""
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("query.py", "attentive.py"):
            text = path.read_text()
            assert "softmax(dim=-1)" not in text and "scaled_dot_product_attention" not in text, path.name


def test_every_file_outside_a_store_is_written_through_files_py():
    """Whole or absent: only vqt_cache/files.py writes files (temporary file, fsync, rename), lock files aside. A
    store's chunks are the store's: zarr writes them, or store/chunks.py as zarr's local store does (temporary
    file, rename), and a shard's checksum and completion flag, written last, vouch for them."""
    import re

    # a figure saved into an in-memory buffer (`savefig(buffer`) is fine: the bytes then go through files.py
    writes = re.compile(r"\.write_text\(|\.write_bytes\(|\bsave_file\(|torch\.save\(|\.savefig\([^b]|open\([^)]*\"w")
    for path in PACKAGE.rglob("*.py"):
        if path.name != "files.py" and path.relative_to(PACKAGE).as_posix() != "store/chunks.py":
            found = [line for line in path.read_text().splitlines() if writes.search(line) and ".lock" not in line]
            assert not found, (path.name, found)


def test_the_tests_do_not_import_bench():
    """bench/ measures the package; the tests prove it. Neither leans on the other (plain `pytest` collects all)."""
    for path in Path(__file__).parent.glob("*.py"):
        assert "bench" not in _imports(path), path.name


def test_checksums_hashes_and_versions_are_read_through_the_fail_closed_rule():
    """A reader that fetches a checksum, hash or version with .get() can treat "absent" as "nothing to check";
    every such field is read through errors.recorded instead (issue 30). Two reads are no check and stay:"""
    import re

    allowed = {
        "model.py": 'table.get("version", 1)',  # a method's version: runs from before it are version 1 (its
        # forward, not a check; config.json is covered by metrics.json's checksum)
        "store/create.py": 'attrs.get("format_version") not in',  # only picks check_format's version sentence
    }

    fields = "checksums?|metadata_hash|rows_hash|index_hash|format_version|version"
    pattern = re.compile(rf"""\.get\(\s*["']({fields})["']""")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and allowed.get(str(path.relative_to(PACKAGE)), "\0") not in line
    ]
    assert found == [], found
