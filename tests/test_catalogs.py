"""The two registries, each defined once: datasets (dataset_catalog.DATASETS, datasets.ADAPTERS) and methods
(methods.CATALOG). Their torch-free catalogs name in help and errors exactly what can be opened or trained."""

from vqt_cache import dataset_catalog, datasets, methods

from conftest import error_line, run_cli


def test_every_catalogued_dataset_has_one_adapter_and_no_adapter_is_uncatalogued():
    assert set(dataset_catalog.FAMILIES) == set(datasets.ADAPTERS)
    assert datasets.list_datasets()[: len(dataset_catalog.DATASETS)] == list(dataset_catalog.DATASETS)


def test_help_and_the_unknown_dataset_error_name_every_built_in_dataset(tmp_path):
    code, text = run_cli("extract", "--help")
    flat = " ".join(text.replace("│", " ").split())
    assert code == 0 and all(name in flat for name in dataset_catalog.DATASETS), flat
    code, text = run_cli("extract", "--backbone", "vit_b16", "--dataset", "mnist", "--out", str(tmp_path / "s"))
    line = error_line(code, text)
    assert line.startswith("error: unknown dataset 'mnist': use ") and all(n in line for n in dataset_catalog.DATASETS)


def test_every_catalogued_method_opens_and_carries_its_name():
    for name in methods.CATALOG:
        assert methods.get(name).name == name
    code, text = run_cli("train", "--help")
    flat = " ".join(text.replace("│", " ").split())
    assert all(name in flat for name in methods.CATALOG), flat
