"""VQT models: the cached one that stage two trains, and the live one that runs on raw images.

Both hold the same trainable parts (queries + head); they differ only in where the image tokens come from.
`CachedVQT` reads them from a cache through the query path. `LiveVQT` is the reference semantics of the
authors' code: one forward of the frozen backbone in which each block sees [image tokens; queries] with an
attention mask (image tokens never attend to queries, queries attend to image tokens only), computed by timm's
own Block.forward; it is the `predict` path and the ground truth that the cached path is tested against.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vqt_cache.backbones import Backbone
from vqt_cache.heads import assemble_features, feature_dim, linear_head
from vqt_cache.query import Queries, QueryPath, query_init_bound


class CachedVQT(nn.Module):
    """Queries + frozen query path + linear head, fed by (final feature, layer-major cache)."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        num_queries: int,
        num_classes: int,
        patch_size: tuple[int, int],
        layout: str = "kv",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dim = blocks[0].norm1.normalized_shape[0]
        self.queries = Queries(len(blocks), num_queries, dim, query_init_bound(patch_size, dim), dropout)
        self.path = QueryPath(blocks, layout)
        self.head = linear_head(feature_dim(dim, len(blocks), num_queries), num_classes)

    @classmethod
    def for_backbone(cls, backbone: Backbone, num_queries: int, num_classes: int, **kwargs) -> CachedVQT:
        return cls(backbone.blocks, num_queries, num_classes, backbone.patch_size, **kwargs)

    def features(self, final: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """(B, D) final feature + cache -> (B, F) normalised features."""
        return assemble_features(final, self.path(self.queries(final.shape[0]), cache))

    def forward(self, final: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(final, cache))

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """What a run folder stores: the queries (L, T, D) and the head."""
        return {"queries": self.queries.prompts, "head.weight": self.head.weight, "head.bias": self.head.bias}


class LiveVQT(nn.Module):
    """The frozen backbone run on images with the queries of a `CachedVQT` appended to every block's input."""

    def __init__(self, backbone: Backbone, vqt: CachedVQT) -> None:
        super().__init__()
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

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, F) normalised features."""
        queries = self.vqt.queries(images.shape[0])
        outputs: list[torch.Tensor] = []
        if queries.shape[2] == 0:
            final = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
            return assemble_features(final, queries)
        with self._appended_queries(queries, outputs):
            final = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return assemble_features(final, torch.stack(outputs, dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqt.head(self.features(images))
