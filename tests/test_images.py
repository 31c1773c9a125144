"""Every image mode becomes the 8-bit RGB an image library's users expect (vqt_cache/images.py), the same on the
paths that decode images: extraction and live evaluation (`Dataset.load_image`), Hugging Face rows, and predict.

Each mode is held to a reference conversion written here from the mode's definition (or torchvision's decoder),
not to Pillow's `convert("RGB")`, which saturates 16-bit pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqt_cache.datasets import BadImage, Dataset

from conftest import run_cli

RNG = np.random.default_rng(0)


def _load(path: Path) -> np.ndarray:
    """The pixels extraction, live evaluation and predict decode from a file."""
    dataset = Dataset(name="images", root=path.parent, splits={}, class_names=[])
    return np.asarray(dataset.load_image(path.name))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_a_16_bit_png_is_scaled_not_saturated(tmp_path):
    from torchvision.io import ImageReadMode, decode_png, read_file
    from torchvision.transforms.v2.functional import to_dtype

    values = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    reference = to_dtype(decode_png(read_file(str(path)), ImageReadMode.UNCHANGED), torch.uint8, scale=True)
    assert reference.dtype == torch.uint8 and (reference[0].numpy() == values >> 8).all()
    pixels = _load(path)
    assert pixels.shape == (12, 10, 3) and (pixels == reference[0].numpy()[..., None]).all()
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # what a plain conversion gave


def test_a_palette_image_with_transparency_is_its_palette_colours(tmp_path):
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (9, 7)).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert (_load(path) == palette[index]).all()


def test_grey_with_alpha_drops_the_alpha(tmp_path):
    grey, alpha = (RNG.integers(0, 256, (6, 5)).astype(np.uint8) for _ in range(2))
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA").save(path)
    assert (_load(path) == grey[..., None]).all()


def test_cmyk_is_converted_by_its_definition(tmp_path):
    cmyk = RNG.integers(0, 256, (6, 5, 4)).astype(np.uint8)
    path = tmp_path / "cmyk.tiff"
    Image.fromarray(cmyk, mode="CMYK").save(path)
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    reference = (255 - c) * (255 - k) / 255  # subtractive: each ink and the black key remove light
    assert np.abs(_load(path) - reference).max() <= 1.0


def test_an_exif_rotated_photo_is_seen_upright(tmp_path):
    pixels = RNG.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation 6: the stored picture is to be turned 90 degrees clockwise to be seen
    path = tmp_path / "sideways.png"
    image.save(path, exif=exif)
    assert (_load(path) == np.rot90(pixels, k=-1)).all()


def test_a_floating_point_image_is_one_sentence(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(RNG.random((4, 4)).astype(np.float32), mode="F").save(path)
    with pytest.raises(BadImage, match="floating-point pixels"):
        _load(path)


def test_predict_gives_a_16_bit_picture_the_answer_of_its_8_bit_twin(tmp_path, tiny_store):
    from test_wrong_numbers import TRAIN

    code, text = run_cli("train", "--store", tiny_store, *TRAIN, "--out", str(tmp_path / "run"))
    assert code == 0, text
    values = RNG.integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray((values >> 8).astype(np.uint8), mode="L").save(tmp_path / "twin.png")
    answers = []
    for name in ("deep.png", "twin.png"):
        code, text = run_cli("predict", str(tmp_path / "run"), str(tmp_path / name), "--json")
        assert code == 0, text
        answers.append(text.replace(name, "IMAGE"))
    assert answers[0] == answers[1]
