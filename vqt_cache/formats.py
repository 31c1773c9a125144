"""What a store can hold and stage two can compute in, and the defaults (torch-free: the CLI shows these).

The defaults come from measurements (README, "Choosing layout and dtype"): LN1 outputs in int8 with a float16 scale
per token and 64 channels cost 1.87 MB per ViT-B/16 image, a quarter of keys/values in float16, with demo accuracy
within 0.1 point of float32 and stage two as fast at T = 1.
"""

LAYOUTS = ("kv", "hidden")
DTYPES = ("float16", "float32", "int8")  # int8: quantized with a float16 scale per token and channel group
CODECS = ("none", "zstd", "blosc")
DEFAULT_LAYOUT = "hidden"
DEFAULT_DTYPE = "int8"
DEFAULT_CODEC = "none"

# stage one (extract; the live forward of evaluate and predict): images per forward, images per logical shard
# (the unit of writing and resuming), image-decoding processes, and what to do with an unreadable image
EXTRACT_BATCH_SIZE = 32
SHARD_SIZE = 64
WORKERS = 2
ON_BAD_IMAGE = ("fail", "skip")

# stage two's query path: float32 (what the exactness tests prove) or bfloat16 matmuls under autocast; "auto" is
# bf16 where bf16 matmuls are fast (AMX/AVX512-BF16 CPUs, bf16 GPUs), float32 elsewhere (README, "Precision")
PRECISIONS = ("float32", "bf16")
DEFAULT_PRECISION = "auto"
