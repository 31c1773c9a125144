"""One decoded image -> the 8-bit RGB picture the backbone's preprocessing takes, whatever the file's mode.

Extraction, live evaluation and `predict` all convert through `to_rgb`, so an image gives the same pixels (and the
same features) on every path. What it does, mode by mode, as an image library's users expect:

- EXIF orientation is applied first (a phone photo stored sideways is seen upright), as torchvision's
  `decode_image(apply_exif_orientation=True)` and Hugging Face `datasets` do.
- 16-bit grayscale ("I;16", "I;16L", "I;16B", and "I" as Pillow opens 16-bit PNGs) is scaled to 8 bits by its high
  byte (v >> 8, torchvision's `to_dtype(uint16 -> uint8, scale=True)`), then replicated to three channels. A plain
  `convert("RGB")` clips every value above 255 to white, which saturates almost the whole picture.
- Palette images ("P", "PA") are looked up in their palette; alpha ("LA", "RGBA", "PA", a palette's transparency) is
  dropped, as torchvision's and timm's loaders do; CMYK and the other 8-bit modes use Pillow's conversion.
- Floating-point images ("F") have no agreed range: refused in one sentence (`UnsupportedImage`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnsupportedImage(ValueError):
    """An image whose pixels have no agreed 8-bit meaning."""


def to_rgb(image: Image.Image) -> Image.Image:
    """The image upright (EXIF orientation) and as 8-bit RGB (see the module's notes)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        raise UnsupportedImage("it holds floating-point pixels, which have no agreed 8-bit range; save it as 8 bits")
    if image.mode in ("P", "PA") and (image.mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")  # the palette's transparency goes with the alpha, not into the colours
    return image if image.mode == "RGB" else image.convert("RGB")
