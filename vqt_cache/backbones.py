"""Frozen timm ViT backbones: short names, weight loading, geometry, fingerprint.

One factory (`load_backbone`) and one table of short names (`BACKBONES`). The model itself is timm's; this
module never re-implements a block, it only checks that the blocks are of a kind the VQT query path covers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vqt_cache.errors import VQTError, first_line
from vqt_cache.formats import FORWARD_PRECISION, PRECISIONS, batch_axis, layer_shape

# Short name -> (timm name with pretrained tag, model kwargs). Any other timm ViT name is accepted as is.
BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_b16": ("vit_base_patch16_224.orig_in21k", {}),  # the paper's main backbone (ImageNet-21k supervised)
    "vit_b16_in1k": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {}),
    # MAE: global average pool of the final-normed patch tokens (the pre-training checkpoint has no fc_norm)
    "vit_b16_mae": ("vit_base_patch16_224.mae", {"global_pool": "avg", "fc_norm": False}),
    "vit_b16_dino": ("vit_base_patch16_224.dino", {}),
    "vit_b14_dinov2": ("vit_base_patch14_dinov2.lvd142m", {}),
    "vit_b14_dinov2_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", {}),
    "vit_b16_clip": ("vit_base_patch16_clip_quickgelu_224.openai", {}),  # pre_norm + QuickGELU
    "vit_l16": ("vit_large_patch16_224.augreg_in21k", {}),
    "vit_s16": ("vit_small_patch16_224.augreg_in21k", {}),
}

# Every stochastic part of the frozen model is switched off, so train/eval mode never changes its output.
_NO_DROP = dict(
    drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0
)


@dataclass
class Backbone:
    """A frozen timm VisionTransformer plus what stage one and stage two need to know about it."""

    name: str
    timm_name: str
    kwargs: dict[str, Any]
    model: VisionTransformer
    fingerprint: str = field(repr=False)
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from (`weights_source`)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def heads(self) -> int:
        return self.model.blocks[0].attn.num_heads

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)  # type: ignore[return-value]

    @property
    def prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def tokens(self) -> int:
        """N: image tokens seen by every block (patches + class/register tokens)."""
        return self.model.patch_embed.num_patches + self.prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def feature_kind(self) -> str:
        """How the final feature f_0 is pooled: 'token' (CLS), 'avg' (+fc_norm), ... as timm's global_pool."""
        pool = self.model.global_pool or "none"
        return f"{pool}+fc_norm" if not isinstance(self.model.fc_norm, nn.Identity) else pool

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing for this model (input_size, interpolation, mean, std, crop_pct, crop_mode).

        The input size is the model's own (its token count depends on it), also when img_size was overridden.
        """
        config = timm.data.resolve_model_data_config(self.model)
        return {**config, "input_size": (3, *self.model.patch_embed.img_size)}

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, recorded in stores and run folders."""
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "kwargs": self.kwargs,
            "fingerprint": self.fingerprint,
            "checksum": weights_checksum(self.model),
            "weights": self.weights,
            "depth": self.depth,
            "dim": self.dim,
            "heads": self.heads,
            "tokens": self.tokens,
            "prefix_tokens": self.prefix_tokens,
            "patch_size": list(self.patch_size),
            "feature_kind": self.feature_kind,
        }

    @torch.no_grad()
    def forward_cache(
        self,
        images: torch.Tensor,
        layout: str = "hidden",
        dtype: torch.dtype = torch.float32,
        layer_major: bool = False,
        probes: dict[str, torch.Tensor] | None = None,
        precision: str = FORWARD_PRECISION,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen model once; capture what stage two needs from inside its own blocks (no recompute).

        Each layer's capture is copied once, cast to `dtype` on the way, into one buffer.

        Returns:
            final: (B, D) the model's own final feature f_0 (pre-logits), float32.
            layers in `dtype`: (B, L, N, D) X̂_l = LN1(Z_{l-1}) for layout "hidden", captured at norm1; or
                (B, L, 2, H, N, dh) K_l (after k_norm) and V_l for layout "kv", captured at attn.qkv. With
                `layer_major`, the query path's own order instead: (L, B, N, D) or (L, 2, B, H, N, dh).

        probes: filled, when given, by the same forward with the probe arrays (`capturing_probes`).
        precision: "float32" (timm's forward as it is) or "bf16" (the same forward under bfloat16 autocast, as
            `forward_autocast` runs it: its matmuls in bfloat16, what autocast keeps in float32 so).
        """
        B, L, N, D, H = images.shape[0], self.depth, self.tokens, self.dim, self.heads
        row = list(layer_shape(layout, L, H, N, D))
        shape = row[: batch_axis(layout)] + [B] + row[batch_axis(layout) :] if layer_major else [B, *row]
        out = torch.empty(shape, dtype=dtype, device=images.device)
        per_layer = out if layer_major else out.transpose(0, 1)  # indexed by layer first either way

        def capture_hidden(layer: int, x_hat: torch.Tensor) -> None:
            per_layer[layer].copy_(x_hat)

        def capture_kv(layer: int, qkv_out: torch.Tensor) -> None:
            _, k, v = qkv_out.chunk(3, dim=-1)
            keys, values = heads_kv(self.blocks[layer], k, v)
            kv = per_layer[layer] if layer_major else per_layer[layer].transpose(0, 1)  # (2, B, H, N, dh)
            kv[0].copy_(keys)  # (B, H, N, dh), cast on the copy
            kv[1].copy_(values)

        if layout == "hidden":
            modules, capture = [blk.norm1 for blk in self.blocks], capture_hidden
        else:
            modules, capture = [blk.attn.qkv for blk in self.blocks], capture_kv
        hooks = [m.register_forward_hook(lambda _m, _i, o, i=i: capture(i, o)) for i, m in enumerate(modules)]
        try:
            probing = capturing_probes(self.model, probes) if probes is not None else ExitStack()
            with probing, forward_autocast(images.device, precision):
                final = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        finally:
            for h in hooks:
                h.remove()
        return final.float(), out


def forward_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The frozen forward's arithmetic for a store of `precision` ("float32": as it is; "bf16": bfloat16 autocast on
    the device), for extraction and every live forward on the store alike."""
    if precision not in PRECISIONS:
        raise VQTError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def capturing_probes(model: nn.Module, probes: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, a forward of the timm ViT `model` fills `probes` with what the attentive and linear-multi
    probes read, all through the model's final norm: "tokens" (B, P, D) the final block's patch tokens,
    "patch_mean" (B, D) their mean, and (once the block exits) "class_tokens" (B, L, D) every block's class token
    (its first token: the store refuses `--probes` for a backbone without one)."""
    first: list[torch.Tensor] = []

    def keep_first(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        first.append(output[:, 0])

    def keep_patches(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        patches = output[:, model.num_prefix_tokens :]
        probes["tokens"], probes["patch_mean"] = patches, patches.mean(dim=1)

    handles = [block.register_forward_hook(keep_first) for block in model.blocks]
    handles.append(model.norm.register_forward_hook(keep_patches))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    probes["class_tokens"] = model.norm(torch.stack(first, dim=1))


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise VQTError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise VQTError(f"device {name!r} is not available: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def heads_kv(block: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys (k_norm applied, as its attention does) and values, split into heads: each (B, H, N, dh).

    k, v: (B, N, H·dh), the key and value parts of the block's qkv projection. The results are views where
    possible (no copy), for the caller to place where it needs them.
    """
    attn = block.attn
    B, N, _ = k.shape
    k = attn.k_norm(k.view(B, N, attn.num_heads, attn.head_dim))
    return k.transpose(1, 2), v.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)


def resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """Short name or timm name -> (timm name, default model kwargs)."""
    timm_name, kwargs = BACKBONES.get(name, (name, {}))
    if not timm.is_model(timm_name.split(".")[0]):
        known = ", ".join(sorted(BACKBONES))
        raise VQTError(f"unknown backbone {name!r}: use one of {known} or a timm ViT model name")
    return timm_name, dict(kwargs)


def check_supported(model: nn.Module, name: str) -> None:
    """Fail loudly on models whose blocks the VQT query path does not reproduce exactly."""
    if not isinstance(model, VisionTransformer):
        raise VQTError(f"backbone {name!r} is a {type(model).__name__}, but VQT needs a timm VisionTransformer")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise VQTError(
                f"block {i} of {name!r} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; the VQT "
                "query path supports only timm's pre-norm Block with the standard Attention"
            )
        if blk.attn.gate is not None:
            raise VQTError(f"block {i} of {name!r} uses gated attention, which the VQT query path does not support")


def weights_fingerprint(model: nn.Module, digest: Any = None) -> str:
    """sha256 (or `digest`) over the frozen state dict (names, dtypes, shapes and bytes), in name order. The sha256
    is the backbone's identity, which stores and runs record."""
    digest = hashlib.sha256() if digest is None else digest
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_checksum(model: nn.Module) -> str:
    """blake3 over what `weights_fingerprint` reads: the check a store's weights pass when stage two rebuilds the
    backbone, four times faster than the sha256 (ViT-B/16 on this CPU: 0.07 s instead of 0.32 s)."""
    import blake3

    return weights_fingerprint(model, blake3.blake3())


RANDOM_SEED = 0  # "random" weights are drawn with this seed: the same on every run, so such stores resume


def weights_source(weights: str | Path | None, model: nn.Module) -> dict[str, Any]:
    """Where a backbone's weights came from, as stores and run folders record it: random with its seed, a file
    with its absolute path and sha256, or timm's pretrained tag with its hub id and, when the local cache holds
    it, the snapshot revision."""
    if weights == "random":
        return {"source": "random", "seed": RANDOM_SEED}
    if weights is not None:
        path = Path(weights).resolve()
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        return {"source": "file", "path": str(path), "sha256": sha256}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    found = {"source": "pretrained", "tag": f"{cfg.get('architecture')}.{cfg.get('tag')}"}
    if cfg.get("hf_hub_id"):
        cached = _cached_hub_file(cfg["hf_hub_id"])
        found["hf_hub_id"] = cfg["hf_hub_id"]
        found["revision"] = cached and Path(cached).parent.name  # .../snapshots/<revision>/<file>
    return found


HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")


def _cached_hub_file(repo_id: str) -> str | None:
    """The path of a hub repository's weights file in the local Hugging Face cache, if it holds one."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def _check_fetchable(timm_name: str) -> None:
    """Pretrained weights missing from the local cache, with HF_HUB_OFFLINE set or a hub whose name does not
    resolve (no network), are one sentence at once, not a minute of retries and warnings."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    repo = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
    if not repo or _cached_hub_file(repo):
        return
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.getaddrinfo(host, 443)
            return  # a network: timm downloads them into the cache
        except OSError:
            why = f"{host} cannot be reached (no network)"
    raise VQTError(
        f"the pretrained weights of {timm_name!r} ({repo}) are not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}: fetch them where there is a network (or point HF_HOME at a cache "
        "that holds them), or pass --weights FILE or --weights random"
    )


def _create(timm_name: str, weights: str | Path | None, kwargs: dict[str, Any]) -> nn.Module:
    args = {**_NO_DROP, **kwargs, "num_classes": 0}
    if weights is None:
        _check_fetchable(timm_name)
    if weights is None or weights == "random":
        overlay = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise VQTError(f"weights file {str(path)!r} does not exist")
        # timm's own pretrained-cfg overlay: its checkpoint filter adapts .pth/.safetensors/.npz layouts.
        overlay = {"file": str(path), "source": "", "hf_hub_id": None, "custom_load": path.suffix == ".npz"}
    try:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_SEED)
            return timm.create_model(timm_name, pretrained=weights != "random", pretrained_cfg_overlay=overlay, **args)
    except (TypeError, AssertionError) as exc:  # timm's model constructors reject bad arguments this way
        raise VQTError(f"bad model arguments {kwargs} for {timm_name!r}: {exc}") from exc
    except (RuntimeError, KeyError, ValueError) as exc:
        if overlay is None:
            raise
        raise VQTError(f"weights file {weights!s} does not fit {timm_name!r}: {_state_dict_error(exc)}") from exc
    except Exception as exc:  # hub, network and cache errors come in many types; report them as one sentence
        if overlay is not None:
            raise VQTError(f"could not read weights file {weights!s}: {exc}") from exc
        raise VQTError(
            f"could not load pretrained weights for {timm_name!r} from the local timm/Hugging Face cache "
            f"({type(exc).__name__}); pass --weights FILE or --weights random"
        ) from exc


def load_backbone(name: str, weights: str | Path | None = None, **kwargs: Any) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: short name from `BACKBONES` or any timm ViT name.
        weights: None for the local timm/HF cache, "random" for random init (tests, demo), or a weights file
            (.pth, .safetensors, .npz) loaded through timm's pretrained-cfg overlay.
        **kwargs: timm model arguments (img_size, depth, ...), recorded with the backbone.

    Raises:
        VQTError: unknown name, missing or unfitting weights file, unsupported block type.
    """
    timm_name, defaults = resolve_name(name)
    kwargs = {**defaults, **kwargs}
    geometry(name, **kwargs)  # any timm VisionTransformer of supported blocks (ViT, DeiT, ...): checked before loading
    model = _create(timm_name, weights, kwargs)
    model.eval().requires_grad_(False)
    source = weights_source(weights, model)
    return Backbone(name, timm_name, dict(kwargs), model, weights_fingerprint(model), source)


def geometry(name: str, **kwargs: Any) -> dict[str, int]:
    """depth, dim, heads, tokens and prefix tokens of a backbone, without weights (built on the meta device: no
    memory, no hub)."""
    timm_name, defaults = resolve_name(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, **{**defaults, **kwargs, "num_classes": 0})
    except (TypeError, AssertionError) as exc:
        raise VQTError(f"bad model arguments {kwargs} for {timm_name!r}: {exc}") from exc
    check_supported(model, name)
    shape = Backbone(name, timm_name, kwargs, model, fingerprint="")
    keys = ("depth", "dim", "heads", "tokens", "prefix_tokens")
    return {key: getattr(shape, key) for key in keys}


def _state_dict_error(exc: Exception) -> str:
    """load_state_dict's complaint in one line, with the tensors it names (its first line names none)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line.startswith(("Missing key", "Unexpected key", "size mismatch"))]
    text = "; ".join(detail) or first_line(exc)
    return text if len(text) <= 300 else text[:297] + "..."


def backbone_from_weights(description: dict[str, Any], weights: dict[str, np.ndarray]) -> Backbone:
    """Rebuild a store's frozen backbone from its stored tensors (no download, no weights file).

    Raises:
        VQTError: the rebuilt weights do not hash to the fingerprint the store recorded.
    """
    with torch.device("meta"):  # no random init, no second copy: the stored tensors become the parameters
        model = _create(description["timm_name"], "random", description["kwargs"])
    check_supported(model, description["name"])
    try:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise RuntimeError("some tensors of the model are not in the store")
    except RuntimeError as exc:
        raise VQTError(f"the stored weights do not fit {description['timm_name']!r}: {_state_dict_error(exc)}") from exc
    model.eval().requires_grad_(False)
    fingerprint = description["fingerprint"]
    if "checksum" in description:  # the same bytes as the fingerprint's, hashed fast (recorded since format 4)
        intact = weights_checksum(model) == description["checksum"]
    else:
        intact = weights_fingerprint(model) == fingerprint
    if not intact:
        raise VQTError("the stored backbone weights do not match the store's recorded fingerprint; re-extract it")
    recorded = dict(description.get("weights") or {})
    name, timm_name, kwargs = description["name"], description["timm_name"], dict(description["kwargs"])
    return Backbone(name, timm_name, kwargs, model, fingerprint, recorded)
