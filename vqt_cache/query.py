"""The VQT query path: learnable query tokens pushed through frozen timm blocks against cached image tokens.

This is the only module that does attention math (docs/method.md §2). It reuses each frozen block's own modules
(norm1, attn.qkv, attn.q_norm/k_norm, attn.proj, ls1, norm2, mlp, ls2) and never runs the image tokens:
those come from a cache, in one of two layouts, always layer-major so that a layer's slice is contiguous:

    kv:     (L, 2, B, H, N, dh)   keys (after k_norm) and values, head-major: no transposed copy per step
    hidden: (L, B, N, D)          X̂_l = LN1(Z_{l-1}); half the bytes, K/V folded into the GEMMs (docs/method.md §4)

Autograd records only the query tokens' activations: the cache carries no gradient.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from vqt_cache.backbones import heads_kv
from vqt_cache.errors import VQTError
from vqt_cache.formats import DEFAULT_QUERY_PATH, LAYOUTS, PRECISIONS, QUERY_PATHS
from vqt_cache.recipe import DROPOUT

# the dtype the query path reads its cache in, per precision (formats.PRECISIONS)
CACHE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def flush_subnormals() -> None:
    """Make this process's CPU math flush subnormal floats to zero (a process-wide setting, kept afterwards).

    Once the queries have trained, their attention produces subnormal floats, which x86 CPUs compute about four
    times slower (issue 14: 36-42 img/s instead of 196 on a real ViT-B/16 store). Flushed, they become zeros: a
    change below 1.2e-38 in absolute value. GPUs are unaffected; the call is harmless there.
    """
    torch.set_flush_denormal(True)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run faster than float32 here: a CUDA GPU with bf16 tensor cores (Ampere and
    later), or a CPU with AMX or AVX512-BF16 (a bf16 GEMM runs at 7.4x float32 on this project's 2-core AMX CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent -> assume not
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def resolve_precision(name: str, device: torch.device) -> str:
    """ "float32" or "bf16"; "auto" is bf16 where `bf16_is_fast`, else float32."""
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "float32"
    if name not in PRECISIONS:
        raise VQTError(f"unknown precision {name!r}: use one of auto, {', '.join(PRECISIONS)}")
    return name


def query_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """v of the U(-v, v) query init: sqrt(6 / (3·p_h·p_w + D)) (= 0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


class Queries(nn.Module):
    """Learnable query tokens P (L, T, D), U(-v, v) init per layer, per-sample dropout in training."""

    def __init__(
        self,
        depth: int,
        num_queries: int,
        dim: int,
        init_bound: float,
        dropout: float = DROPOUT,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 0:
            raise ValueError(f"the number of queries must be >= 0, got {num_queries}")
        self.prompts = nn.Parameter(torch.empty(depth, num_queries, dim))
        nn.init.uniform_(self.prompts, -init_bound, init_bound, generator=generator)
        self.p = dropout

    @property
    def num_queries(self) -> int:
        return self.prompts.shape[1]

    def forward(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """P̃ = Dropout(P) for every image: (B, L, T, D); an expanded view (no copy) in eval mode.

        Each image gets its own dropout mask, drawn from `generator` (the global RNG when None).
        """
        prompts = self.prompts.expand(batch_size, *self.prompts.shape)
        if not self.training or self.p == 0:
            return prompts
        keep = torch.rand(prompts.shape, generator=generator, device=prompts.device) >= self.p
        return prompts * keep / (1 - self.p)


def _split_qkv(attn: nn.Module) -> tuple[torch.Tensor, ...]:
    """W_q, W_k, W_v (each (H·dh, D), views) and their biases (None when qkv has no bias)."""
    weights = attn.qkv.weight.chunk(3)
    biases = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
    return (*weights, *biases)


def keys_values(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """K (after k_norm) and V of the image tokens from X̂ = LN1(Z): (B, N, D) -> (2, B, H, N, dh)."""
    _, w_k, w_v, _, b_k, b_v = _split_qkv(block.attn)
    return torch.stack(heads_kv(block, F.linear(hidden, w_k, b_k), F.linear(hidden, w_v, b_v)))


def kv_from_hidden(blocks: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """Per-layer K/V from per-layer X̂: (L, B, N, D) -> the kv cache layout (L, 2, B, H, N, dh)."""
    return torch.stack([keys_values(blk, hidden[layer]) for layer, blk in enumerate(blocks)])


def _attend_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ) v per (image, head) as two batched GEMMs. q (B,H,T,dh) pre-scaled; k, v (B,H,N,dh)."""
    B, H, T, dh = q.shape
    N = k.shape[2]
    scores = torch.bmm(q.reshape(B * H, T, dh), k.reshape(B * H, N, dh).transpose(1, 2))  # (B·H, T, N)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, N, dh)).view(B, H, T, dh)


def _attend_hidden(
    q: torch.Tensor, x: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None
) -> torch.Tensor:
    """Attention against X̂ with K/V folded into the GEMMs (exact when k_norm is the identity).

    Scores: q_h K_hᵀ = (q_h W_k,h) X̂ᵀ + q_h·b_k,h; the second term is constant along each score row and cancels
    in the softmax. Values: A_h V_h = (A_h X̂) W_v,hᵀ + b_v,h because softmax rows sum to one.
    q (B,H,T,dh) pre-scaled; x (B,N,D); w_k, w_v (H·dh, D). Returns (B,H,T,dh).
    """
    B, H, T, dh = q.shape
    D = x.shape[-1]
    q_tilde = torch.bmm(q.transpose(0, 1).reshape(H, B * T, dh), w_k.view(H, dh, D))  # (H, B·T, D)
    q_tilde = q_tilde.view(H, B, T, D).transpose(0, 1).reshape(B, H * T, D)
    scores = torch.bmm(q_tilde, x.transpose(1, 2))  # (B, H·T, N)
    mixed = torch.bmm(scores.softmax(dim=-1), x)  # (B, H·T, D) = A X̂
    out = torch.bmm(mixed.view(B, H, T, D).transpose(0, 1).reshape(H, B * T, D), w_v.view(H, dh, D).transpose(1, 2))
    out = out.view(H, B, T, dh).transpose(0, 1)  # (B, H, T, dh)
    return out if b_v is None else out + b_v.view(1, H, 1, dh)


def query_block(block: nn.Module, p: torch.Tensor, layer_cache: torch.Tensor, layout: str) -> torch.Tensor:
    """One frozen timm Block applied to query tokens p (B, T, D) whose attention reads only the cached tokens.

    layer_cache is (2, B, H, N, dh) for layout "kv" or (B, N, D) for "hidden". Returns O_l (B, T, D).
    """
    attn = block.attn
    B, T, _ = p.shape
    H, dh = attn.num_heads, attn.head_dim
    w_q, w_k, w_v, b_q, _, b_v = _split_qkv(attn)
    q = attn.q_norm(F.linear(block.norm1(p), w_q, b_q).view(B, T, H, dh)).transpose(1, 2) * attn.scale  # (B,H,T,dh)
    if layout == "kv":
        o = _attend_kv(q, layer_cache[0], layer_cache[1])
    elif isinstance(attn.k_norm, nn.Identity):
        o = _attend_hidden(q, layer_cache, w_k, w_v, b_v)
    else:  # k_norm breaks the score trick: recompute K/V from X̂ (exact, ~2·N·D² MACs per image and layer)
        k, v = keys_values(block, layer_cache)
        o = _attend_kv(q, k, v)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, T, H * dh))))
    x = p + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class _QueryBlock(nn.Module):
    """`query_block` as a module, so that torch.func can call one block's math with another block's weights."""

    def __init__(self, block: nn.Module, layout: str) -> None:
        super().__init__()
        self.block, self.layout = block, layout

    def forward(self, p: torch.Tensor, layer_cache: torch.Tensor) -> torch.Tensor:
        return query_block(self.block, p, layer_cache, self.layout)


class QueryPath(nn.Module):
    """All layers: queries (B, L, T, D) + a layer-major cache -> per-layer query outputs O (B, L, T, D), float32.

    With precision "bf16" the cache is expected in bfloat16 (`CachedSplit` widens it so) and the blocks run under
    autocast: their matmuls in bfloat16 with float32 accumulation; the layer norms, the residual stream and the
    outputs stay float32.

    Layer l's queries read only layer l's cache, so the layers are independent. `path` says how they run: "eager",
    block after block (each block's own modules: about 40 kernels per layer and step); "batched", all layers at
    once (`torch.func.vmap` over the blocks' stacked weights: the same math, each op one kernel for every layer,
    an 8x smaller op count); "auto", batched on a GPU, where a step's kernel launches cost more than its FLOPs,
    and eager on the CPU, where batched GEMMs over per-layer weights are slower than plain ones.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        layout: str = "kv",
        precision: str = "float32",
        path: str = DEFAULT_QUERY_PATH,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if path not in QUERY_PATHS:
            raise VQTError(f"unknown query path {path!r}: use one of {', '.join(QUERY_PATHS)}")
        self.blocks = blocks  # frozen, built without dropout or drop-path: train/eval mode does not matter
        self.layout = layout
        self.precision = precision
        self.path = path
        self._stacked: tuple | None = None  # ((device, layout, precision), weights, buffers, a weightless block)
        self._bf16: tuple | None = None  # (device, the blocks with bfloat16 Linear weights)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype the path reads its cache in."""
        return CACHE_DTYPES[self.precision]

    def batched(self, device: torch.device) -> bool:
        """Whether the layers run as one batched kernel per op on `device`."""
        return self.path == "batched" or self.path == "auto" and device.type == "cuda"

    def forward(self, queries: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
        if queries.shape[2] == 0:  # T = 0: nothing to run (the linear-probe special case)
            return queries
        bf16 = self.precision == "bf16"
        blocks = self._blocks(cache.device)
        with torch.autocast(cache.device.type, dtype=torch.bfloat16, enabled=bf16):
            if self.batched(cache.device):
                return self._all_layers(blocks, queries, cache).float()
            # unbind, not queries[:, layer]: the backward of a slice is a zero-filled copy of all layers' queries,
            # once per layer (12 x 24 MB per step at B = 64, T = 10); unbind's backward stacks the slices once
            outs = [
                query_block(blk, p, cache[layer], self.layout)
                for layer, (blk, p) in enumerate(zip(blocks, queries.unbind(1), strict=True))
            ]
        return torch.stack(outs, dim=1).float()

    def _blocks(self, device: torch.device) -> nn.ModuleList:
        """The blocks the path runs: the frozen blocks themselves (float32), or for bf16 a copy of them whose Linear
        weights are bfloat16 already. Autocast would cast those weights to the very same values on every step (a
        fifth of a ViT-B/16 step on this CPU); the layer norms, biases and layer scales stay float32."""
        if self.precision != "bf16":
            return self.blocks
        if self._bf16 is None or self._bf16[0] != device:
            blocks = copy.deepcopy(self.blocks)
            for module in blocks.modules():
                if isinstance(module, nn.Linear):
                    module.weight.data = module.weight.data.to(torch.bfloat16)
            self._bf16 = (device, blocks)
        return self._bf16[1]

    def _all_layers(self, blocks: nn.ModuleList, queries: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """Every layer's `query_block` in one vmap over the blocks' weights stacked along a layer axis."""
        from torch.func import functional_call, stack_module_state, vmap

        key = (cache.device, self.layout, self.precision)
        if self._stacked is None or self._stacked[0] != key:  # stacked once per device (a copy of the weights)
            wrapped = [_QueryBlock(block, self.layout) for block in blocks]
            weights, buffers = stack_module_state(wrapped)
            weights = {name: w.detach() for name, w in weights.items()}  # frozen: no gradient reaches them
            self._stacked = (key, weights, buffers, copy.deepcopy(wrapped[0]).to("meta"))
        _, weights, buffers, base = self._stacked

        def layer(w: dict, b: dict, p: torch.Tensor, layer_cache: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (w, b), (p, layer_cache))

        return vmap(layer, in_dims=(0, 0, 1, 0), out_dims=1)(weights, buffers, queries, cache)
