"""vqt-cache: Visual Query Tuning over cached ViT keys/values (Tu, Mai, Chao, CVPR 2023)."""

__version__ = "0.1.0"


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
