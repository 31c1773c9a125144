"""The live path on raw images: the store's frozen backbone plus a trained run's queries and head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vqt_cache.backbones import resolve_device
from vqt_cache.datasets import BadImage, Dataset, build_transform
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import compressed_head, load_run
from vqt_cache.export import is_export, load_exported
from vqt_cache.formats import EXTRACT_BATCH_SIZE
from vqt_cache.model import live_features
from vqt_cache.recipe import DEVICE
from vqt_cache.run_folder import compressed_run


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
    run_dir: str | Path,
    images: list[str | Path],
    store_url: str | None = None,
    batch_size: int = EXTRACT_BATCH_SIZE,
    device: str = DEVICE,
) -> list[Prediction]:
    """Class, probability and logits for each image file, live (`model.live_features`: the store's preprocessing
    and forward precision, then the run's cached path).
    `run_dir`: a finished run folder, its `compressed/` folder (the compressed head on the kept features), or the
    file `vqt-cache export` wrote."""
    head = None
    if (parent := compressed_run(run_dir)) is not None:
        run_dir = parent
        head = compressed_head(run_dir)
    if is_export(run_dir):  # `vqt-cache export`: everything in one file, no store
        exported = load_exported(run_dir)
        backbone, model = exported.backbone, exported.model
        preprocessing, class_names, precision = exported.preprocessing, exported.class_names, exported.precision
        if exported.head is not None:
            head = exported.kept, exported.head
    else:
        loaded = load_run(run_dir, store_url)
        backbone, model = loaded.backbone, loaded.model
        preprocessing = loaded.store.attrs["preprocessing"]
        class_names = loaded.store.attrs["dataset"]["class_names"]
        precision = loaded.store.forward_precision
    transform = build_transform(preprocessing)
    reader = Dataset("files", Path("/"), class_names, {})
    tensors = []
    for image in images:
        try:
            tensors.append(transform(reader.load_image(str(Path(image).absolute()))))
        except BadImage as exc:
            raise VQTError(str(exc)) from exc
    target = resolve_device(device)
    backbone.model.to(target)
    model.eval().to(target)
    kept, linear = head if head is not None else (None, model.runs[0].head)  # the run's head, or its compressed one
    kept, linear = (None if kept is None else kept.to(target)), linear.to(target)
    results = []
    with torch.no_grad():
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start : start + batch_size]).to(target)
            features = live_features(model, backbone, batch, precision)[0]
            logits = linear(features if kept is None else features[:, kept]).float().cpu()
            if not bool(logits.isfinite().all()):  # never a probability
                bad = start + int((~logits.isfinite().all(dim=1)).nonzero()[0])
                raise VQTError(f"the model gives non-finite logits for {images[bad]}; its run cannot classify it")
            probs = logits.softmax(dim=1)
            for i, row in enumerate(logits):
                label = int(row.argmax())
                results.append(
                    Prediction(
                        image=str(images[start + i]),
                        label=label,
                        class_name=class_names[label],
                        probability=probs[i, label].item(),
                        logits=row.tolist(),
                    )
                )
    return results
