"""The live path on raw images: the store's frozen backbone plus a trained run's queries and head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vqt_cache.datasets import BadImage, Dataset, build_transform
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import load_run
from vqt_cache.formats import EXTRACT_BATCH_SIZE
from vqt_cache.model import LiveVQT


def predict(
    run_dir: str | Path, images: list[str | Path], store_url: str | None = None, batch_size: int = EXTRACT_BATCH_SIZE
) -> list[dict[str, Any]]:
    """Class, probability and logits for each image file, through `LiveVQT` with the store's preprocessing."""
    config, store, backbone, model = load_run(run_dir, store_url)
    attrs = store.attrs
    transform = build_transform(attrs["preprocessing"])
    reader = Dataset("files", Path("/"), attrs["dataset"]["class_names"], {})
    tensors = []
    for image in images:
        try:
            tensors.append(transform(reader.load_image(str(Path(image).absolute()))))
        except BadImage as exc:
            raise VQTError(str(exc)) from exc
    live = LiveVQT(backbone, model).eval()
    results = []
    with torch.no_grad():
        for start in range(0, len(tensors), batch_size):
            logits = live(torch.stack(tensors[start : start + batch_size]))[0]
            probs = logits.softmax(dim=1)
            for i, row in enumerate(logits):
                label = int(row.argmax())
                results.append(
                    {
                        "image": str(images[start + i]),
                        "label": label,
                        "class": attrs["dataset"]["class_names"][label],
                        "probability": probs[i, label].item(),
                        "logits": row.tolist(),
                    }
                )
    return results
