"""What a store can hold, and what a new store holds unless told otherwise (torch-free: the CLI shows these).

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
