"""What every method is: `Method`, the object a method module defines, and `Inputs`, what a run's forward reads.

A run (`model.RunParameters`) is a method at one size with its parameters: T query tokens per layer (VQT only:
they ride the shared query path, `query.QueryPath`), the method's own `probe` module (the attentive probe's
cross-attention block; most methods have none) and a linear head over the method's features, initialised as the
run's recipe says (`recipe.Optimization.head_init`). Initialisation draws queries, then the probe, then the head,
from one generator seeded with the run's seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqt_cache.errors import VQTError

# what a method may read beside f_0: "cache" (each layer's tokens, through the query path), "means" (each layer's
# mean token), "probes" (the store's probe arrays: the final block's tokens, every block's class token, the patch
# mean; written by `extract --probes`)
INPUTS = ("cache", "means", "probes")


@dataclass(frozen=True)
class Geometry:
    """The backbone's shape, as a run's config.json "model" table records it."""

    depth: int
    dim: int
    heads: int = 0  # 0: not recorded (runs of vqt-cache before the attentive probe; no method of theirs needs it)
    patch_size: tuple[int, int] = (16, 16)

    @classmethod
    def of(cls, backbone: Any) -> Geometry:
        """A `backbones.Backbone`'s geometry."""
        return cls(backbone.depth, backbone.dim, backbone.heads, tuple(backbone.patch_size))


@dataclass
class Inputs:
    """One batch, as a run's forward reads it: each is (B, ...) float32 (the cache's outputs in its precision), or
    None where no run of the model reads it."""

    final: torch.Tensor  # (B, D) f_0
    outputs: torch.Tensor | None = None  # (B, L, T, D) this run's query outputs (VQT)
    means: torch.Tensor | None = None  # (B, L, D) each layer's mean cached token
    tokens: torch.Tensor | None = None  # (B, P, D) the final block's patch tokens through the final norm
    class_tokens: torch.Tensor | None = None  # (B, L, D) each block's class token through the final norm
    patch_mean: torch.Tensor | None = None  # (B, D) the mean of the final block's patch tokens, final norm applied


class Method:
    """A method: override what differs. The defaults describe a linear head over f_0 alone."""

    name: str = ""
    label: str = ""  # in reports and tables
    size: str | None = None  # what a run's size is called ("T" for VQT); None: one size, 0
    default_sizes: tuple[int, ...] = (0,)  # the sizes a grid trains when none are asked for
    reads: frozenset[str] = frozenset()  # of INPUTS
    compressible: bool = False  # group-lasso compression (docs/method.md §6) applies
    live_predict: bool = True  # `model.LiveVQT` (the queries inside the frozen forward) can run it
    style: str = "--"  # its line in the report's plots (VQT's are solid)
    recipe: str = "vqt"  # its paper's optimization (`recipe.OPTIMIZATIONS`), which recipe "own" trains it with
    lr_scale: float = 1.0  # under the shared (VQT's) recipe, its learning rate is the grid's times this
    version: int = 1  # raised when its forward or initialisation changes: runs of another version are not reused

    # -- sizes and names ---------------------------------------------------------------------------------------
    def sizes(self, requested: Mapping[str, Sequence[int]]) -> list[int]:
        """The sizes a grid trains, from the lists asked for by size name ({"T": --queries, "n": --blocks}): a
        method with a size trains those asked for its size (else its defaults), one without trains one."""
        if not self.size:
            return list(self.default_sizes)
        return list(requested.get(self.size) or self.default_sizes)

    def check_size(self, size: int) -> int:
        """The run's size as recorded (methods without one: 0), or one sentence saying why it is wrong."""
        if size < 0:
            raise VQTError(f"the number of queries T must be >= 0, got {size}")
        return size if self.size else 0

    def run_name(self, size: int) -> str:
        """How a run folder's name starts: "vqt-T10", "linear"."""
        return f"{self.name}-{self.size}{size}" if self.size else self.name

    def describe(self, size: int) -> str:
        """A run's method in reports: "VQT T=10", "linear probe"."""
        return f"{self.label} {self.size}={size}" if self.size else self.label

    def reads_cache(self, size: int) -> bool:
        return "cache" in self.reads

    # -- parameters and forward ---------------------------------------------------------------------------------
    def num_queries(self, size: int) -> int:
        """Query tokens per layer on the shared query path."""
        return 0

    def check_geometry(self, size: int, geometry: Geometry) -> None:
        """Nothing, or one sentence: this size cannot run on this backbone."""

    def probe(self, size: int, geometry: Geometry, generator: torch.Generator) -> nn.Module | None:
        """The method's own trainable module (None: only queries and head)."""
        return None

    def check_version(self, version: int) -> None:
        """Nothing, or one sentence: a run recorded with another version of this method is not this method's."""
        if version != self.version:
            raise VQTError(
                f"the run was trained with version {version} of the {self.name} method, this vqt-cache computes "
                f"version {self.version} (another forward or initialisation); train it again"
            )

    def feature_dim(self, size: int, geometry: Geometry) -> int:
        return geometry.dim

    def features(self, size: int, probe: nn.Module | None, inputs: Inputs) -> torch.Tensor:
        """(B, F) features for the head."""
        raise NotImplementedError
