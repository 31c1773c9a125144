"""The public API: the README's "Python API" example runs as written, and the package's names stay lazy."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import vqt_cache

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_example_runs_and_gives_typed_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes under data/, relative to where it runs
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    runs, best, test, loaded, val = (namespace[k] for k in ("runs", "best", "test", "loaded", "val"))
    assert len(runs) == 4 and all(isinstance(r, vqt_cache.TrainedRun) for r in runs)
    assert all(Path(r.dir, "metrics.json").is_file() for r in runs)
    assert isinstance(test, vqt_cache.Evaluation) and test.live and test.images == 20 and 0 <= test.top1 <= 1
    assert Path(best.dir, "eval", "test.json").is_file()
    assert isinstance(loaded, vqt_cache.LoadedRun) and loaded.config.run.name == best.name
    assert tuple(val.features.shape) == (20, 2, 17, 48) and val.labels.tolist() == [i % 3 for i in range(80, 100)]
    assert "test" in capsys.readouterr().out


def test_a_users_dataset_needs_no_private_fields():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(vqt_cache.Dataset)}
    assert "loader" in fields and not any(name.startswith("_") for name in fields)


def test_every_public_name_resolves_and_importing_the_package_loads_no_torch():
    for name in vqt_cache.__all__:
        assert getattr(vqt_cache, name) is not None
    with pytest.raises(AttributeError):
        vqt_cache.no_such_name  # noqa: B018
    code = "import sys, vqt_cache; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
