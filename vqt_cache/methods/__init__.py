"""The methods stage two trains, by name: one module each under vqt_cache/methods/, one line each in CATALOG.

This file is torch-free, so the CLI names and explains the methods in `--help` and in its errors without importing
torch; `get(name)` imports a method's module on first use. A method object (`base.Method`) says what it reads from
the store, which sizes it trains (T for VQT, n blocks for linear-multi), its parameters, its forward, and how it is
named in run folders, reports and exports. Everything else asks it: no other module compares method names.

Adding a method: write vqt_cache/methods/<name>.py with a `METHOD` object, and add one line below. A method made at
run time (a notebook, a test) is added with `register(method)`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vqt_cache.errors import VQTError

if TYPE_CHECKING:
    from vqt_cache.methods.base import Method

# name -> (module, what it is, in a few words)
CATALOG: dict[str, tuple[str, str]] = {
    "vqt": ("vqt_cache.methods.vqt", "visual query tuning: T queries per layer (the paper)"),
    "linear": ("vqt_cache.methods.linear", "linear probe on the final feature f_0"),
    "linear-norm": ("vqt_cache.methods.linear:NORMALISED", "linear probe on f_0/|f_0| (VQT's f_0 group)"),
    "pooled": ("vqt_cache.methods.pooled", "f_0 and each layer's mean value vector (Head2Toe-like)"),
    "attentive": ("vqt_cache.methods.attentive", "attentive probe: a cross-attention block over the last tokens"),
    "linear-multi": ("vqt_cache.methods.linear_multi", "DINOv2's linear protocol: last n class tokens + patch mean"),
}
_registered: dict[str, Method] = {}


def names() -> tuple[str, ...]:
    """Every method's name, built-in first."""
    return (*CATALOG, *(name for name in _registered if name not in CATALOG))


def check_name(name: str) -> None:
    """Nothing, or one sentence naming the methods there are."""
    if name not in CATALOG and name not in _registered:
        raise VQTError(f"unknown method {name!r}: use one of {', '.join(names())}")


def describe() -> str:
    """The methods in one line each: for `--help`."""
    return "; ".join(f"{name} ({CATALOG[name][1]})" if name in CATALOG else name for name in names())


def get(name: str) -> Method:
    """The method object called `name` (its module is imported on first use)."""
    check_name(name)
    if name not in _registered:
        module, _, attribute = CATALOG[name][0].partition(":")  # "module" or "module:OBJECT" (default METHOD)
        _registered[name] = getattr(importlib.import_module(module), attribute or "METHOD")
    return _registered[name]


def register(method: Method) -> None:
    """Add a method made at run time under its `name` (it must not shadow a built-in one)."""
    if method.name in CATALOG:
        raise VQTError(f"method {method.name!r} is built in; register yours under another name")
    _registered[method.name] = method
