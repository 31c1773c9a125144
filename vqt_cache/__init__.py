"""vqt-cache: Visual Query Tuning over cached ViT features (Tu, Mai, Chao, CVPR 2023).

The Python API (`vqt_cache/api.py`) is importable from here and loaded on first use, so `import vqt_cache` (and
the command line's `--help`) does not import torch:

    import vqt_cache as vqt
    summary = vqt.extract(backbone="vit_b16", dataset="digits", weights="random")
    runs = vqt.train(store=summary.store, queries=[1, 10], epochs=20)
"""

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "Evaluation",
    "ExtractSummary",
    "LoadedRun",
    "Prediction",
    "SplitTensors",
    "TrainedRun",
    "VQTError",
    "__version__",
    "evaluate",
    "extract",
    "list_backbones",
    "list_datasets",
    "load_run",
    "open_store",
    "package_versions",
    "predict",
    "read_split",
    "register_dataset",
    "train",
]


def __getattr__(name: str):
    if name in __all__:
        from vqt_cache import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqt_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def package_versions() -> dict[str, str]:
    """Versions recorded in every store and run folder."""
    import numcodecs
    import timm
    import torch
    import zarr

    return {
        "vqt_cache": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
    }
