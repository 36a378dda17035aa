"""`finetune drift FOLDER`: a folder of images against a model's drift reference, in one test.

The same pieces as the server: the model resolved as the server resolves it (`deploy.service.Source`: 'champion', a
registry version or a file), its reference checked as the server checks it (`deploy.service.reference_of`), the
images decoded by the model's own decode path, and the test of `tasks.drift.compare` (KS per principal component of
the embeddings, per class of the probabilities and per image statistic of the decoded input, Bonferroni). A folder is
one sample, so there is no alarm rule: the verdict is the test's (`alpha`). Unreadable files are counted and
skipped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.predict import check_inputs, iter_images
from deploy.service import Source, reference_of
from tasks import drift
from tasks.images import ImageError
from tasks.inference import OnnxClassifier


@dataclass(frozen=True)
class BatchDrift:
    model: str
    version: str | None
    images: int
    unreadable: int
    result: drift.Comparison
    reference: dict

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "images": self.images, "unreadable": self.unreadable,
                "drift": self.result.reject, **self.result.to_dict(), "reference": self.reference}


def check(model: str, paths: list[Path], registry: Path, alpha: float = 0.01, max_images: int = 10_000,
          workers: int = 4, batch_size: int = 32) -> BatchDrift:
    """Test the images `paths` name (files, folders, manifests; at most `max_images`) against the model's reference."""
    check_inputs(paths)
    path, version, _ = Source.parse(model, registry).locate()
    classifier = OnnxClassifier(path, batch_size=batch_size)
    reference, why = reference_of(classifier)
    if reference is None:
        raise drift.DriftError(f"cannot test drift against {path}: {why}")
    files = []
    for f in iter_images(paths):
        if len(files) == max_images:
            break
        files.append(f)
    embeddings, probabilities, statistics, unreadable = [], [], [], 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), batch_size):
            loaded = list(pool.map(_load(classifier), files[start:start + batch_size]))
            ok = [x for x in loaded if x is not None]
            unreadable += len(loaded) - len(ok)
            if ok:
                x = np.stack(ok)
                _, probs, emb = classifier.run_with_embedding(x)
                embeddings.append(emb)
                probabilities.append(probs)
                statistics.append(drift.image_statistics(x))
    if not embeddings:
        raise drift.DriftError(f"no readable images in {', '.join(map(str, paths))}")
    result = drift.compare(reference, np.concatenate(embeddings), np.concatenate(probabilities), alpha,
                           np.concatenate(statistics))
    info = {"n": len(reference.embedding), "components": len(reference.basis), **reference.info}
    return BatchDrift(str(path), version, result.n, unreadable, result, info)


def _load(classifier: OnnxClassifier):
    def load(path: Path) -> np.ndarray | None:
        try:
            return classifier.load(path)
        except ImageError:
            return None

    return load
