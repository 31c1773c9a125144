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
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from vqt_cache import methods, recipe
from vqt_cache.backbones import Backbone, capturing_probes
from vqt_cache.errors import VQTError
from vqt_cache.formats import DEFAULT_QUERY_PATH, FORWARD_PRECISION, batch_axis
from vqt_cache.heads import linear_head, token_means
from vqt_cache.methods.base import Geometry, Inputs
from vqt_cache.query import Queries, QueryPath, query_init_bound
from vqt_cache.recipe import DROPOUT, METHOD

if TYPE_CHECKING:
    from vqt_cache.run_folder import ModelRecord


class RunParameters(nn.Module):
    """One run's trainable parameters: a method (`methods.get`) at one size, with its queries (L, T, D) on the shared
    query path (T = 0 unless the method has queries), its own probe module (or None) and a linear head.

    Initialisation draws from a generator seeded with `seed`: queries first, then the probe, then the head.
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
        heads: int = 0,
        head_init: str | None = None,
    ) -> None:
        """`head_init`: how the head is drawn (`heads.linear_head`); None: as the method's own recipe does."""
        super().__init__()
        self.method = methods.get(method)
        self.size = self.method.check_size(num_queries)
        geometry = Geometry(depth, dim, heads, tuple(patch_size))
        self.method.check_geometry(self.size, geometry)
        generator = torch.Generator().manual_seed(seed)
        T = self.method.num_queries(self.size)
        self.queries = Queries(depth, T, dim, query_init_bound(patch_size, dim), dropout, generator)
        self.probe = self.method.probe(self.size, geometry, generator)
        if head_init is None:
            head_init = recipe.OPTIMIZATIONS[self.method.recipe].head_init
        self.head = linear_head(self.method.feature_dim(self.size, geometry), num_classes, generator, head_init)

    @classmethod
    def from_record(cls, model: ModelRecord, dropout: float = 0.0) -> RunParameters:
        """Untrained parameters shaped by a run's model record (config.json's "model" table, or an export's): VQTError
        for an unknown method or version."""
        methods.get(model.method).check_version(model.version)
        dims = (model.queries, model.depth, model.dim, model.num_classes)
        return cls(model.method, *dims, tuple(model.patch_size), dropout, heads=model.heads)

    @property
    def reads_cache(self) -> bool:
        return self.method.reads_cache(self.size)

    def features(self, inputs: Inputs) -> torch.Tensor:
        """This run's (B, F) features (`inputs.outputs`: its own query outputs)."""
        return self.method.features(self.size, self.probe, inputs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a run folder stores (model.safetensors, and each checkpoint): queries (L, T, D), the probe's
        parameters (probe.<name>), head.weight (C, F), head.bias (C,)."""
        probe = {} if self.probe is None else {f"probe.{k}": v for k, v in self.probe.named_parameters()}
        return {"queries": self.queries.prompts, **probe, "head.weight": self.head.weight, "head.bias": self.head.bias}

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


def value_means(blocks: nn.ModuleList, means: torch.Tensor) -> torch.Tensor:
    """Each layer's mean value vector V̄_l from its mean LN1 input X̄_l (B, L, D): the attention's qkv projection is
    affine, so the mean of the values is the value of the mean (V̄_l = W_v X̄_l + b_v), heads concatenated as a kv
    store holds them. A hidden store thus gives the pooled method the feature a kv store gives it."""
    D = means.shape[-1]
    values = []
    with torch.autocast(means.device.type, enabled=False):
        for i, block in enumerate(blocks):  # the value rows of qkv only: a third of the projection
            qkv = block.attn.qkv
            bias = None if qkv.bias is None else qkv.bias[2 * D :]
            values.append(torch.nn.functional.linear(means[:, i].float(), qkv.weight[2 * D :], bias))
    return torch.stack(values, 1)


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
        if any run's queries read it, the mean tokens and the probe arrays if any run's method reads them."""
        return {
            "dtype": self.path.cache_dtype,
            "cache": self.reads_cache,
            "means": self.needs("means"),
            "probes": self.needs("probes"),
        }

    def needs(self, what: str) -> bool:
        """Whether any run's method reads `what` (one of methods.base.INPUTS)."""
        return any(what in run.method.reads for run in self.runs)

    @property
    def reads_cache(self) -> bool:
        """Whether any run's queries read the cached tokens (else f_0 and what the methods read suffice)."""
        return any(run.reads_cache for run in self.runs)

    def features(
        self,
        final: torch.Tensor,
        cache: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None = None,
        means: torch.Tensor | None = None,
        probes: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """(B, D) final features + cache -> each run's (B, F) features (dropout masks from `generators`).

        `means` (B, L, D) (`heads.token_means`) is computed from the cache when a method reads it and it is not
        given; `probes` holds the store's probe arrays (tokens, class_tokens, patch_mean) where a method reads them.
        """
        prompts = _prompts(self.runs, final.shape[0], generators)
        outputs = self.path(prompts, cache)
        if means is None and self.needs("means"):
            means = token_means(cache.movedim(batch_axis(self.path.layout), 0), self.path.layout)
        if means is not None and self.path.layout == "hidden":
            means = value_means(self.path.blocks, means)
        inputs = Inputs(final, None, means, **(probes or {}))
        return [
            run.features(replace(inputs, outputs=out))
            for run, out in zip(self.runs, _split_outputs(self.runs, outputs), strict=True)
        ]

    def forward(
        self,
        final: torch.Tensor,
        cache: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None = None,
        means: torch.Tensor | None = None,
        probes: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Each run's (B, C) logits."""
        features = self.features(final, cache, generators, means, probes)
        return [run.head(f) for run, f in zip(self.runs, features, strict=True)]


def live_features(
    model: CachedVQT, backbone: Backbone, images: torch.Tensor, precision: str = FORWARD_PRECISION
) -> list[torch.Tensor]:
    """(B, 3, H, W) preprocessed images -> each run's (B, F) features, live: the store's frozen forward (in the
    store's `precision`) captures what a cache would hold, and the runs read it through the cached path's own code.
    Live evaluation and `predict` run this; `LiveVQT` (the queries inside the frozen forward) is what it equals."""
    probes = {} if model.needs("probes") else None  # the probes' arrays, from the same forward
    final, cache = backbone.forward_cache(
        images, layout=model.path.layout, layer_major=True, probes=probes, precision=precision
    )
    return model.features(final, cache, probes=probes)


class LiveVQT(nn.Module):
    """The frozen backbone run on images with the queries of every run appended to every block's input."""

    def __init__(self, backbone: Backbone, vqt: CachedVQT) -> None:
        super().__init__()
        refused = [run.method.name for run in vqt.runs if not run.method.live_predict]
        if refused:
            raise VQTError(f"the live path does not run {refused[0]} runs")
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
        outputs: list[torch.Tensor] = []
        probes: dict[str, torch.Tensor] = {}
        with ExitStack() as hooks:
            if queries.shape[2]:
                hooks.enter_context(self._appended_queries(queries, outputs))
            if self.vqt.needs("probes"):  # registered after the queries' hooks: they see the image tokens only
                hooks.enter_context(capturing_probes(self.backbone, probes))
            final = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        inputs = Inputs(final, **probes)
        per_run = _split_outputs(runs, torch.stack(outputs, dim=1)) if outputs else [queries] * len(runs)
        return [run.features(replace(inputs, outputs=out)) for run, out in zip(runs, per_run, strict=True)]

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
