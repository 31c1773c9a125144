"""The live path on raw images: the store's frozen backbone plus a trained run's queries and head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vqt_cache.datasets import BadImage, Dataset, build_transform
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import load_run
from vqt_cache.formats import EXTRACT_BATCH_SIZE
from vqt_cache.model import LiveVQT


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One image's predicted class (index and name), its probability and every class's logit."""

    image: str
    label: int
    class_name: str
    probability: float
    logits: list[float]

    def record(self) -> dict:
        """As `predict --json` prints it."""
        return {
            "image": self.image,
            "label": self.label,
            "class": self.class_name,
            "probability": self.probability,
            "logits": self.logits,
        }


def predict(
    run_dir: str | Path, images: list[str | Path], store_url: str | None = None, batch_size: int = EXTRACT_BATCH_SIZE
) -> list[Prediction]:
    """Class, probability and logits for each image file, through `LiveVQT` with the store's preprocessing."""
    loaded = load_run(run_dir, store_url)
    attrs = loaded.store.attrs
    transform = build_transform(attrs["preprocessing"])
    reader = Dataset("files", Path("/"), attrs["dataset"]["class_names"], {})
    tensors = []
    for image in images:
        try:
            tensors.append(transform(reader.load_image(str(Path(image).absolute()))))
        except BadImage as exc:
            raise VQTError(str(exc)) from exc
    live = LiveVQT(loaded.backbone, loaded.model).eval()
    results = []
    with torch.no_grad():
        for start in range(0, len(tensors), batch_size):
            logits = live(torch.stack(tensors[start : start + batch_size]))[0]
            probs = logits.softmax(dim=1)
            for i, row in enumerate(logits):
                label = int(row.argmax())
                results.append(
                    Prediction(
                        image=str(images[start + i]),
                        label=label,
                        class_name=attrs["dataset"]["class_names"][label],
                        probability=probs[i, label].item(),
                        logits=row.tolist(),
                    )
                )
    return results
