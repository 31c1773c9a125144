"""VQT models: the cached one that stage two trains, and the live one that runs on raw images.

A `RunParameters` holds one configuration's (`training.RunSpec`'s) trainable parts: its queries (L, T, D) and its
linear head; a run folder (`run_folder.py`) holds them once trained. Runs are
independent token sets, so any number of them share one pass of the frozen query path: their queries are
concatenated along T, the path runs once, and each run reads back its own outputs (docs/method.md §8). Their
gradients never mix, since each run's loss depends only on its own parameters.

`CachedVQT` feeds the runs from a cache. `LiveVQT` is the reference semantics of the authors' code: one forward
of the frozen backbone in which each block sees [image tokens; queries] with an attention mask (image tokens
never attend to queries, queries attend to image tokens only), computed by timm's own Block.forward. It is the
`predict` path and the ground truth that the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vqt_cache.backbones import Backbone
from vqt_cache.errors import VQTError
from vqt_cache.formats import DEFAULT_QUERY_PATH
from vqt_cache.heads import assemble_features, feature_dim, linear_head, pooled_features, token_means
from vqt_cache.query import Queries, QueryPath, query_init_bound
from vqt_cache.recipe import DROPOUT, METHOD, METHODS


class RunParameters(nn.Module):
    """One configuration's trainable parameters: queries (T = 0 unless method is "vqt") and a linear head.

    Initialisation draws from a generator seeded with `seed`: queries first, then the head.
    """

    def __init__(
        self,
        method: str,
        num_queries: int,
        depth: int,
        dim: int,
        num_classes: int,
        patch_size: tuple[int, int],
        dropout: float = DROPOUT,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise VQTError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if num_queries < 0:
            raise VQTError(f"the number of queries must be >= 0, got {num_queries}")
        generator = torch.Generator().manual_seed(seed)
        self.method = method
        T = num_queries if method == "vqt" else 0
        self.queries = Queries(depth, T, dim, query_init_bound(patch_size, dim), dropout, generator)
        in_features = dim * (1 + depth) if method == "pooled" else feature_dim(dim, depth, T)
        self.head = linear_head(in_features, num_classes, generator)

    @classmethod
    def from_table(cls, table: dict, dropout: float = 0.0) -> RunParameters:
        """Untrained parameters shaped by a run folder's config.json "model" table (KeyError, TypeError or
        ValueError when it lacks an entry or holds a wrong one)."""
        dims = (int(table[k]) for k in ("queries", "depth", "dim", "num_classes"))
        return cls(table["method"], *dims, tuple(table["patch_size"]), dropout)

    def features(self, final: torch.Tensor, outputs: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """This run's (B, F) features from f_0, its query outputs (B, L, T, D) and the pooled baseline features."""
        if self.method == "vqt":
            return assemble_features(final, outputs)
        if self.method == "linear":
            return F.normalize(final, dim=-1)
        return pooled

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a run folder stores (model.safetensors, and each checkpoint): queries (L, T, D), head.weight (C, F),
        head.bias (C,)."""
        return {"queries": self.queries.prompts, "head.weight": self.head.weight, "head.bias": self.head.bias}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in what `tensors()` gives (shapes checked by the copy: RuntimeError if they differ)."""
        with torch.no_grad():
            for name, target in self.tensors().items():
                target.copy_(tensors[name])


def _split_outputs(runs: Sequence[RunParameters], outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return outputs.split([run.queries.num_queries for run in runs], dim=2)


def _prompts(runs: Sequence[RunParameters], batch_size: int, generators: Sequence[torch.Generator | None] | None):
    generators = generators or [None] * len(runs)
    return torch.cat([run.queries(batch_size, g) for run, g in zip(runs, generators, strict=True)], dim=2)


class CachedVQT(nn.Module):
    """The frozen query path shared by one or more runs, fed by (final feature, layer-major cache)."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        runs: Sequence[RunParameters],
        layout: str = "kv",
        precision: str = "float32",
        query_path: str = DEFAULT_QUERY_PATH,
    ) -> None:
        super().__init__()
        self.path = QueryPath(blocks, layout, precision, query_path)
        self.runs = nn.ModuleList(runs)

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        num_queries: int,
        num_classes: int,
        layout: str = "kv",
        dropout: float = DROPOUT,
        seed: int = 0,
        method: str = METHOD,
    ) -> CachedVQT:
        """A single-run model for `backbone`."""
        run = RunParameters(
            method, num_queries, backbone.depth, backbone.dim, num_classes, backbone.patch_size, dropout, seed
        )
        return cls(backbone.blocks, [run], layout)

    def reads(self) -> dict:
        """What this model's batches must carry, as `CachedSplit` arguments: the cache (in the query path's dtype)
        if any run has queries, the mean tokens if any run is the pooled baseline."""
        return {"dtype": self.path.cache_dtype, "cache": self.reads_cache, "means": self.reads_means}

    @property
    def reads_cache(self) -> bool:
        """Whether any run's queries read the cached tokens (else f_0 and, for pooled runs, the means suffice)."""
        return any(run.queries.num_queries for run in self.runs)

    @property
    def reads_means(self) -> bool:
        """Whether any run is the pooled baseline, which reads each layer's mean token."""
        return any(run.method == "pooled" for run in self.runs)

    def features(
        self,
        final: torch.Tensor,
        cache: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None = None,
        means: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """(B, D) final features + cache -> each run's (B, F) features (dropout masks from `generators`).

        The pooled baseline reads `means` (B, L, D) (`heads.token_means`), computed from the cache when not given.
        """
        prompts = _prompts(self.runs, final.shape[0], generators)
        outputs = self.path(prompts, cache)
        pooled = None
        if self.reads_means:
            if means is None:
                batch_axis = 2 if self.path.layout == "kv" else 1
                means = token_means(cache.movedim(batch_axis, 0), self.path.layout)
            pooled = pooled_features(final, means)
        return [
            run.features(final, out, pooled)
            for run, out in zip(self.runs, _split_outputs(self.runs, outputs), strict=True)
        ]

    def forward(
        self,
        final: torch.Tensor,
        cache: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None = None,
        means: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Each run's (B, C) logits."""
        features = self.features(final, cache, generators, means)
        return [run.head(f) for run, f in zip(self.runs, features, strict=True)]


class LiveVQT(nn.Module):
    """The frozen backbone run on images with the queries of every run appended to every block's input."""

    def __init__(self, backbone: Backbone, vqt: CachedVQT) -> None:
        super().__init__()
        if any(run.method == "pooled" for run in vqt.runs):
            raise VQTError("the live path runs vqt and linear runs only, not the pooled baseline")
        self.backbone = backbone.model
        self.vqt = vqt

    @contextmanager
    def _appended_queries(self, queries: torch.Tensor, outputs: list[torch.Tensor]):
        """Hooks that append layer l's queries to block l's input and split them off its output."""
        T = queries.shape[2]

        def before(block, args, kwargs, layer):
            x = args[0]
            n = x.shape[1]
            mask = torch.zeros(n + T, n + T, dtype=x.dtype, device=x.device)
            mask[:, n:] = float("-inf")  # every token, query or image, attends to the n image tokens only
            return (torch.cat([x, queries[:, layer]], dim=1),), {**kwargs, "attn_mask": mask}

        def after(block, args, output, layer):
            outputs.append(output[:, -T:])
            return output[:, :-T]

        handles = []
        for layer, blk in enumerate(self.backbone.blocks):
            handles.append(blk.register_forward_pre_hook(lambda b, a, k, i=layer: before(b, a, k, i), with_kwargs=True))
            handles.append(blk.register_forward_hook(lambda b, a, o, i=layer: after(b, a, o, i)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) preprocessed images -> each run's (B, F) features."""
        runs = self.vqt.runs
        queries = _prompts(runs, images.shape[0], None)
        if queries.shape[2] == 0:
            final = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
            return [run.features(final, queries, None) for run in runs]
        outputs: list[torch.Tensor] = []
        with self._appended_queries(queries, outputs):
            final = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        per_run = _split_outputs(runs, torch.stack(outputs, dim=1))
        return [run.features(final, out, None) for run, out in zip(runs, per_run, strict=True)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [run.head(f) for run, f in zip(self.vqt.runs, self.features(images), strict=True)]


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for the backward pass of fn(): the distinct storages it saves (counted with saved-tensor
    hooks), minus those of `exclude` (weights, inputs). How tests and benchmarks check that training records only
    the query path (docs/method.md §8)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
