"""The drift reference of an exported model (tasks/drift.py; docs/serving.md "Drift monitoring").

Computed from the exported ONNX file itself, through the inference module, so the reference is exactly what the
server computes for an image: the `embedding` and `probabilities` outputs (and `tasks.drift.image_statistics` of the
uint8 input tensor the model is fed, the server's function on the server's tensor) of

- up to `drift.fit_images` training images (evenly spaced), which fit the PCA (`drift.components` directions);
- up to `drift.reference_images` validation images (the test split when there is none), the reference sample:
  images the weights never trained on, like the traffic the server will see.

The reference is written beside the model (`drift_reference.npz`) and named in the model's metadata
(`drift_reference`: file, sha256, what it holds) before the INT8 model is made from it. An INT8 model kept by the
export gets its own reference sample (the same images through the INT8 file, the same PCA) beside it
(`drift_reference.int8.npz`), so serving `--precision int8` never compares INT8 outputs with fp32 ones. The promote
stage copies both into the registry version with the models.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.drift import IMAGE_STATISTICS, METADATA_KEY, Reference, image_statistics, save_reference
from tasks.export.int8 import evenly_spaced
from tasks.export.onnx_graph import ExportError, update_metadata
from tasks.inference import OnnxClassifier
from tasks.tensors import DecodedOnDemand, batches

log = logging.getLogger("tasks.export")


def sample(manifest: pd.DataFrame, images_dir: Path, splits: tuple[str, ...], cap: int, size: int, workers: int,
           max_pixels: int) -> tuple[str, DecodedOnDemand]:
    """The first of `splits` that has images: (its name, at most `cap` of its images, evenly spaced, decoded batch by
    batch as a pass reaches them)."""
    for split in splits:
        rows = manifest[manifest["split"] == split]
        if len(rows):
            rows = rows.iloc[evenly_spaced(len(rows), cap)]
            return split, DecodedOnDemand([Path(images_dir) / p for p in rows["path"]], size, workers, max_pixels)
    raise ExportError(f"the drift reference needs images of the {' or '.join(splits)} split, and there are none")


def outputs(onnx_path: Path, images: DecodedOnDemand, batch_size: int = 32
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, probabilities, image statistics) of an exported model on `images`, batch by batch."""
    classifier = OnnxClassifier(onnx_path, batch_size=batch_size)
    if not classifier.has_embedding:
        raise ExportError(f"{onnx_path}: the exported graph has no 'embedding' output (the backbone exposes no "
                          "pooled features)")
    emb, probs, stats = [], [], []
    for batch in batches(images, batch_size):
        x = batch.numpy()
        _, p, e = classifier.run_with_embedding(x)
        emb.append(e)
        probs.append(p)
        stats.append(image_statistics(x))
    return np.concatenate(emb), np.concatenate(probs), np.concatenate(stats)


def record(onnx_tmp: Path, destination: Path, manifest: pd.DataFrame, images_dir: Path, size: int, workers: int,
           max_pixels: int, components: int, fit_images: int, reference_images: int
           ) -> tuple[Reference, DecodedOnDemand, dict]:
    """Build the fp32 model's reference, write `destination` (drift_reference.npz) and name it in the model's metadata.
    Returns (the reference, its images, the export report's entry)."""
    t0 = time.time()
    fit_split, fit = sample(manifest, images_dir, ("train",), fit_images, size, workers, max_pixels)
    ref_split, ref = sample(manifest, images_dir, ("val", "test"), reference_images, size, workers, max_pixels)
    if ref_split != "val":
        log.warning("export: no validation images; the drift reference is the test split's outputs")
    info = {"fit_split": fit_split, "n_fit": len(fit), "reference_split": ref_split, "precision": "fp32"}
    embeddings, probabilities, statistics = outputs(onnx_tmp, ref)
    reference = Reference.build(outputs(onnx_tmp, fit)[0], embeddings, probabilities, components, info, statistics)
    report = write(reference, onnx_tmp, destination)
    report["seconds"] = round(time.time() - t0, 2)
    log.info("export: drift reference %s: PCA to %d of %d dimensions on %d %s images, %d %s images as the reference "
             "(%.1fs)", destination, len(reference.basis), reference.dim, len(fit), fit_split, len(ref), ref_split,
             report["seconds"])
    return reference, ref, report


def record_int8(int8_tmp: Path, reference: Reference, images: DecodedOnDemand, destination: Path) -> dict:
    """The INT8 model's reference: the fp32 reference's PCA, the INT8 model's outputs on the same images (and their
    image statistics, the same as the fp32 reference's)."""
    return write(reference.with_sample(*outputs(int8_tmp, images), precision="int8"), int8_tmp, destination)


def write(reference: Reference, model_path: Path, destination: Path) -> dict:
    """Save the reference and name it (file, sha256, what it holds) in the model's metadata; the report's entry."""
    sha = save_reference(destination, reference)
    entry = {"file": destination.name, "sha256": sha, "outputs": ["embedding", "probabilities"],
             "image_statistics": list(IMAGE_STATISTICS) if reference.image is not None else [],
             "components": len(reference.basis), "dim": reference.dim, "n_reference": len(reference.embedding),
             **{k: reference.info[k] for k in ("fit_split", "n_fit", "reference_split", "precision")}}
    update_metadata(model_path, {METADATA_KEY: json.dumps(entry)})
    return {**entry, "path": str(destination), "bytes": destination.stat().st_size}
