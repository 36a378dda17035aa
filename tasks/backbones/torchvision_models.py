"""torchvision classifiers behind timm's model interface, built through torchvision's public API.

`create` resolves a weights enum (`DEFAULT`, `IMAGENET1K_V2`, `ResNet50_Weights.IMAGENET1K_V2`) or a
state_dict file, verifies the file, and records the builder arguments those weights imply
(`builder_kwargs`: class count, ViT image size, Inception's input transform...). `build` rebuilds
the same architecture from that record alone with `torchvision.models.get_model(arch, weights=None,
**kwargs)`; the caller then loads a saved state_dict. No download happens in `build`, and no
torchvision internals are patched.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from tasks.backbones.weights import (
    WeightsError,
    check_hash_prefix,
    fetch_file,
    first_line,
    hub_dir,
    is_file_ref,
    is_offline,
    load_state,
    verify_sha256,
)
from tasks.preprocess import Preprocessing

log = logging.getLogger(__name__)
DEFAULT_NAMES = {"", "default", "imagenet"}
# Old DenseNet checkpoints name layers 'norm.1' where the modules are now 'norm1' (torchvision renames
# them the same way when it loads its own weights).
DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
AUX_HEADS = ("aux1.", "aux2.", "AuxLogits.")  # GoogLeNet/Inception auxiliary heads: dropped, as torchvision does



def _head_name(model: nn.Module) -> str:
    """The classifier of a torchvision model: its last `nn.Linear` (`fc`, `classifier.3`, `heads.head`...).

    Registration order follows forward order in torchvision's classifiers, so the last Linear is
    the one producing the logits; layers before it (MobileNetV3's 960->1280, VGG's MLP) stay in
    the backbone, as in timm.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise WeightsError(f"{type(model).__name__} has no Linear classifier to replace (SqueezeNet's head is a "
                           "convolution); choose another architecture")
    return names[-1]


def _take_dropout_before(model: nn.Module, head_name: str) -> float:
    """Replace a dropout that directly precedes the head with Identity and return its rate.

    timm applies that dropout in `forward_head` (`drop_rate`); doing the same keeps the frozen
    backbone deterministic, so its outputs can be cached exactly.
    """
    parent_name, _, leaf = head_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    names = [name for name, _ in parent.named_children()]
    index = names.index(leaf)
    before = getattr(parent, names[index - 1]) if index > 0 else None
    if not isinstance(before, nn.Dropout):
        return 0.0
    setattr(parent, names[index - 1], nn.Identity())
    return float(before.p)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _holds_trunk(module: nn.Module) -> bool:
    """Whether `module` wraps a stack of repeated blocks (ViT's encoder -> layers) to walk into."""
    return any(isinstance(child, _CONTAINERS) and sum(_has_params(g) for g in child.children()) >= 4
               for child in module.children())


def _module_blocks(module: nn.Module, prefix: str = "") -> list[list[str]]:
    """Parameter names of `module` in ordered blocks: the elements of Sequential/ModuleList/ModuleDict
    containers are blocks, other modules are one block each unless they wrap a trunk of blocks;
    a module's own parameters (ViT's class token) form a block of their own."""
    own = [prefix + name for name, _ in module.named_parameters(recurse=False)]
    blocks = [own] if own else []
    for name, child in module.named_children():
        path = f"{prefix}{name}."
        if isinstance(child, _CONTAINERS):
            blocks += _container_blocks(child, path)
        elif _holds_trunk(child):
            blocks += _module_blocks(child, path)
        elif _has_params(child):
            blocks.append([path + n for n, _ in child.named_parameters()])
    return blocks


def _container_blocks(container: nn.Module, path: str) -> list[list[str]]:
    """Each element of a Sequential/ModuleList/ModuleDict that has parameters is one block."""
    own = [path + n for n, _ in container.named_parameters(recurse=False)]
    return ([own] if own else []) + [[f"{path}{name}.{n}" for n, _ in child.named_parameters()]
                                     for name, child in container.named_children() if _has_params(child)]


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier behind timm's model interface, for every family alike.

    The head is the model's last `nn.Linear`; it moves to `self.head` and an `nn.Identity`
    takes its place, so `self.body` (torchvision's own forward, otherwise untouched) returns
    the pre-logits features. A dropout right before the head becomes `drop_rate`, applied in
    `forward_head` as timm does. Parameter names: `body.<torchvision name>` and `head.*`.
    """

    def __init__(self, model: nn.Module, pretrained_cfg: dict | None = None):
        super().__init__()
        head_name = _head_name(model)
        head = model.get_submodule(head_name)
        self.drop_rate = _take_dropout_before(model, head_name)
        model.set_submodule(head_name, nn.Identity())
        self.body = model
        self.head = head
        self.num_features = head.in_features
        self.num_classes = head.out_features
        self.pretrained_cfg = {**(pretrained_cfg or {}), "classifier": "head", "num_classes": self.num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        ref = next(self.body.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes

    def backbone_blocks(self) -> list[list[str]]:
        return _module_blocks(self.body, "body.")


def _tv():
    from torchvision import models

    return models


def torchvision_archs() -> list[str]:
    """torchvision's classification models (those `source: torchvision` accepts)."""
    return _tv().list_models(module=_tv())


def _check_arch(arch: str) -> None:
    if arch not in torchvision_archs():
        raise WeightsError(f"'{arch}' is not a torchvision classification model; `finetune models --all` lists them")


def weights_enum(arch: str, weights: str):
    """The weights enum member `weights` names for `arch` (`DEFAULT`, `IMAGENET1K_V2`, `X_Weights.NAME`)."""
    _check_arch(arch)
    enum = _tv().get_model_weights(arch)
    owner, _, name = weights.strip().rpartition(".")
    if owner and owner != enum.__name__:
        raise WeightsError(f"'{weights}' are not weights of {arch} (those are {enum.__name__}.*)")
    name = "DEFAULT" if name.lower() in DEFAULT_NAMES else name.upper()
    try:
        return enum[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise WeightsError(f"torchvision has no weights '{weights}' for {arch}; choose one of {choices}") from None


def file_name(weights) -> str:
    """The published file name of a weights enum member (what the torch hub cache stores it as)."""
    return Path(urlparse(weights.url).path).name


def full_name(weights) -> str:
    return f"{type(weights).__name__}.{weights.name}"


def builder_kwargs(arch: str, weights) -> dict:
    """The arguments torchvision's builder passes to the model class for `weights` (see its
    `_ovewrite_named_param` calls), so `get_model(arch, weights=None, **kwargs)` builds the same
    architecture without downloading anything."""
    kwargs: dict = {"num_classes": len(weights.meta["categories"])}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=False, init_weights=False)
    elif arch.startswith("vit_"):
        kwargs["image_size"] = int(weights.meta["min_size"][0])
    elif arch == "maxvit_t":
        kwargs["input_size"] = list(weights.meta["min_size"])
    return kwargs


def _get_model(arch: str, kwargs: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return _tv().get_model(arch, weights=None, **kwargs)


def _fit_keys(arch: str, state: dict) -> dict:
    """The state_dict renames torchvision applies to its own published files."""
    state = {k: v for k, v in state.items() if not k.startswith(AUX_HEADS)}
    if arch.startswith("densenet"):
        state = {("".join(m.groups()) if (m := DENSENET_KEY.match(k)) else k): v for k, v in state.items()}
    return state


def _load(model: nn.Module, arch: str, state: dict, what: str) -> nn.Module:
    try:
        model.load_state_dict(_fit_keys(arch, state))
    except RuntimeError as exc:
        raise WeightsError(f"{what} does not fit torchvision '{arch}': {first_line(exc)}") from None
    return model


def _probe(arch: str) -> nn.Module:
    """`arch` as its builder makes it without weights: on the meta device (no memory) when the
    builder allows it, else on the CPU (RegNet computes its widths from tensors)."""
    builder = _tv().get_model_builder(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.device("meta"):
                return builder()
        except (NotImplementedError, RuntimeError):
            return builder()


def _preprocessing(weights) -> tuple[Preprocessing, dict]:
    """What `weights` expect, from torchvision's own `weights.transforms()`: our contract at their crop
    size and statistics, and their full recipe (informational)."""
    t = weights.transforms()
    pretrained = {"input_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]), "crop": "center",
                  "interpolation": t.interpolation.value, "mean": list(t.mean), "std": list(t.std),
                  "from": f"{full_name(weights)}.transforms()"}
    return Preprocessing(size=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std)), pretrained


def _missing(weights, path: Path, reason: str) -> WeightsError:
    torch_home = os.environ.get("TORCH_HOME", "unset")
    return WeightsError(
        f"torchvision weights {full_name(weights)} are not available: {path} is missing ({reason}). Provide them "
        f"by copying {weights.url} (downloaded on a machine with access) to {path}; or point TORCH_HOME (now "
        f"{torch_home}) at a cache holding hub/checkpoints/{path.name}; or set model.weights=<path or URL of that "
        "file> with model.sha256=<its sha256>"
    )


def _cached_file(weights, sha256: str | None, offline: bool | None) -> tuple[Path, str]:
    """The weights file in the torch hub cache (downloaded there if allowed), verified.

    Cached files are hashed here, since torch.hub only checks the prefix while downloading. An
    explicit `sha256` pins the content and takes precedence over the 8-hex-digit name prefix.
    """
    path = hub_dir() / "checkpoints" / file_name(weights)
    if not path.is_file():
        if is_offline(offline):
            raise _missing(weights, path, "downloads are off")
        prefix = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=prefix.group(1) if prefix else None)
        except Exception as exc:
            raise _missing(weights, path, f"download failed: {first_line(exc)}") from None
    digest = verify_sha256(path, sha256)
    _check_prefix_unless_pinned(path, digest, pinned=bool(sha256))
    return path, digest


def _check_prefix_unless_pinned(path: Path, digest: str, pinned: bool) -> None:
    """The name's hash prefix must match, unless model.sha256 pins the whole content (then: a warning)."""
    try:
        check_hash_prefix(path, digest)
    except WeightsError:
        if not pinned:
            raise
        log.warning("%s does not match the hash prefix in its name; accepted because model.sha256 pins it", path)


def _enum_for_file(arch: str, path: Path):
    """The weights enum whose published file name `path` carries: its architecture and preprocessing apply."""
    _check_arch(arch)
    for weights in _tv().get_model_weights(arch):
        if file_name(weights) == path.name:
            return weights
    return None


def create(arch: str, weights: str, sha256: str | None, offline: bool | None) -> tuple[nn.Module, dict]:
    """A pretrained torchvision classifier (original head kept) and what `build` needs to rebuild it."""
    if is_file_ref(weights):
        path, digest = fetch_file(weights, sha256, offline)
        known = _enum_for_file(arch, path)
        if known:
            _check_prefix_unless_pinned(path, digest, pinned=True)
        state = load_state(path)
        if known:
            kwargs = builder_kwargs(arch, known)
        else:
            head = _head_name(_probe(arch)) + ".weight"
            if head not in state:
                raise WeightsError(f"{path} has no '{head}': not a torchvision '{arch}' state_dict")
            kwargs = {"num_classes": int(state[head].shape[0])}
        preprocessing, pretrained = _preprocessing(known or weights_enum(arch, "DEFAULT"))
        if not known:
            pretrained["from"] = f"assumed: {pretrained['from']} (the checkpoint carries no preprocessing)"
    else:
        known = weights_enum(arch, weights)
        path, digest = _cached_file(known, sha256, offline)
        state = load_state(path)
        kwargs = builder_kwargs(arch, known)
        preprocessing, pretrained = _preprocessing(known)
    raw = _load(_get_model(arch, kwargs), arch, state, str(path))
    model = TorchvisionClassifier(raw, _pretrained_cfg(preprocessing))
    return model, {"weights_name": full_name(known) if known else None, "weights_file": str(path), "sha256": digest,
                   "preprocessing": preprocessing.to_dict(), "pretrained": pretrained, "builder": kwargs}


def build(meta: dict, num_classes: int) -> nn.Module:
    """The architecture `create` recorded in `meta` (no weights loaded, no download)."""
    if "builder" not in meta:
        raise WeightsError("the model metadata has no 'builder' record; run the fetch_model stage again")
    model = TorchvisionClassifier(_get_model(meta["arch"], meta["builder"]),
                                  _pretrained_cfg(Preprocessing.from_dict(meta["preprocessing"])))
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _pretrained_cfg(pre: Preprocessing) -> dict:
    """timm-style `pretrained_cfg` entries (what the wrapped model reports, like a timm model)."""
    return {"mean": pre.mean, "std": pre.std, "input_size": pre.input_shape, "interpolation": pre.interpolation,
            "crop_pct": 1.0}
