"""The built-in datasets by name, torch-free: what `--help`, `plan` and errors name without importing image code.

Each name here has one adapter in `datasets.ADAPTERS` (a test holds the two to each other); a name ending in
`/<task>` is a family whose task follows the slash. Datasets added at run time (`datasets.register_dataset`) join
them in `datasets.list_datasets()`.
"""

from __future__ import annotations

# name -> what it is, in a few words
DATASETS: dict[str, str] = {
    "cub": "CUB-200-2011, its release folder",
    "fgvc/<task>": "the VPT FGVC benchmark: cub, nabirds, oxford_flowers, stanford_dogs, stanford_cars",
    "vtab1k/<task>": "VTAB-1k, one of its 19 tasks",
    "imagefolder": "a folder of <split>/<class>/<image>",
    "classfolder": "a folder of <class>/<image>; splits carved from it",
    "hf": "a Hugging Face dataset saved or cached on disk",
    "digits": "scikit-learn's bundled digits (no download)",
}


def family(name: str) -> str:
    """The adapter a name opens: "vtab1k/dtd" -> "vtab1k"."""
    return name.partition("/")[0]


FAMILIES = tuple(family(name) for name in DATASETS)


def names() -> str:
    """The built-in names, for help and errors."""
    return ", ".join(DATASETS)
