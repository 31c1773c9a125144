"""What a store can hold and stage two can compute in, and the defaults (torch-free: the CLI shows these).

The defaults come from measurements (docs/benchmarks.md, "Sizing, and the default layout and dtype"): LN1 outputs in
int8 with a float16 scale per token and 64 channels cost 1.87 MB per ViT-B/16 image, a quarter of keys/values in
float16, with demo accuracy within 0.1 point of float32 and stage two as fast at T = 1.
"""

import math

LAYOUTS = ("kv", "hidden")
DTYPES = ("float16", "float32", "int8")  # int8: quantized with a float16 scale per token and channel group
GROUP = 64  # int8's channel group (vqt_cache/quantize.py)
CODECS = ("none", "zstd", "blosc")
DEFAULT_LAYOUT = "hidden"
DEFAULT_DTYPE = "int8"
DEFAULT_CODEC = "none"

# stage one (extract; the live forward of evaluate and predict): images per forward, images per logical shard
# (the unit of writing and resuming), image-decoding processes, threads writing shards (their chunk writes and
# hashing release the GIL, so they add up to cores), and what to do with an unreadable image
EXTRACT_BATCH_SIZE = 32
SHARD_SIZE = 64
WORKERS = 2
WRITERS = 4
ON_BAD_IMAGE = ("fail", "skip")
# which library resamples images to the backbone's input size: Pillow (timm's own eval transform), or torch on the
# decoded 8-bit pixels (several times faster on the CPU, each pixel within one level of Pillow's; recorded in the
# store when chosen)
RESAMPLERS = ("pillow", "torch")
DEFAULT_RESAMPLE = "pillow"

# stage one's frozen forward (extract, and the live forward of evaluate, verify and predict on its store): float32,
# whose features are bit-identical to timm's own forward, or bfloat16 autocast (bf16 matmuls; several times faster on
# a GPU); "auto" is bf16 where bf16 matmuls are fast. float32 by default: a store serves every later experiment, so
# a lossy forward is asked for, as a smaller dtype is; a store records "precision": "bf16" when its forward ran so
FORWARD_PRECISION = "float32"

# stage two's query path: float32 (what the exactness tests prove) or bfloat16 matmuls under autocast; "auto" is
# bf16 where bf16 matmuls are fast (AMX/AVX512-BF16 CPUs, bf16 GPUs), float32 elsewhere (docs/guide.md, "Precision";
# its measurements: docs/benchmarks.md, "Precision")
PRECISIONS = ("float32", "bf16")
DEFAULT_PRECISION = "auto"
# how the query path runs its layers (query.QueryPath): block after block, or every layer in one batched kernel per
# op; "auto" batches on a GPU and not on the CPU
QUERY_PATHS = ("auto", "eager", "batched")
DEFAULT_QUERY_PATH = "auto"


def quantized(dtype: str) -> bool:
    """Whether a store dtype keeps 8-bit values with float16 scales (int8), rather than the floats themselves."""
    return dtype == "int8"


def forward_dtype(dtype: str) -> str:
    """The dtype features leave the frozen forward in, for a store of `dtype` (int8 is quantized after it)."""
    return "float32" if quantized(dtype) else dtype


def layer_shape(layout: str, depth: int, heads: int, tokens: int, dim: int) -> tuple[int, ...]:
    """One image's features, all layers: (L, 2, H, N, dh) keys and values for "kv", (L, N, D) LN1 outputs for
    "hidden"."""
    if layout == "kv":
        return (depth, 2, heads, tokens, dim // heads)
    return (depth, tokens, dim)


def batch_axis(layout: str) -> int:
    """Where a layer-major batch (the query path's order) puts its images: (L, 2, B, H, N, dh) or (L, B, N, D)."""
    return 2 if layout == "kv" else 1


def group_for(channels: int) -> int:
    """The channel group of a feature axis: 64, or the largest divisor of 64 that divides `channels`."""
    return math.gcd(channels, GROUP)


def bytes_per_value(kind: str, group: int = GROUP) -> float:
    """Stored bytes per feature value, scales included (float16/float32: 2/4)."""
    if kind in ("float16", "float32"):
        return {"float16": 2.0, "float32": 4.0}[kind]
    return 1.0 + 2.0 / group


HF_COLUMNS = {"image": "image", "label": "label"}  # --dataset hf: the default image and label columns


def size(n: float) -> str:
    """Bytes in the unit that shows them: 512 B, 24.6 kB, 3.42 MB, 1.87 GB, 36.1 TB (decimal units)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"
