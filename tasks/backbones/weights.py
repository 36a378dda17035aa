"""Pretrained weight files: where they come from (local path, URL, the torch hub cache) and their
verification (sha256). Nothing unverified is ever loaded, and files are read with
`weights_only=True` (or safetensors): a pickle that would run code is refused.

Downloads are attempted only when needed and not offline (`offline=True`, or
`FINETUNE_OFFLINE=1` / `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch

from tasks.files import atomic_path, sha256_file

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"", "default", "imagenet"}  # names that mean "the family's default weights"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".safetensors", ".ckpt")
OFFLINE_ENV = ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE")


class WeightsError(RuntimeError):
    """Pretrained weights are unavailable or fail verification."""



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


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(ref: str) -> str:
    """`${NAME}` in a weights URL -> the environment's value, so secrets stay out of params.yaml and dvc.lock."""
    def value(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise WeightsError(f"model.weights refers to ${{{m.group(1)}}}, which is not set in the environment")
        return os.environ[m.group(1)]

    return ENV_REF.sub(value, ref)


def redact(url: str) -> str:
    """A URL fit to write anywhere: user, password and query string (presigned signatures, tokens) removed."""
    parts = urlsplit(url)
    if not parts.scheme or (not parts.netloc and not parts.query):
        return url
    host = parts.hostname or ""
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "<redacted>" if parts.query else "", ""))


def has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme and (parts.username or parts.password or parts.query))


def scrub(text: str, url: str) -> str:
    """`text` (an error message, a log line) with `url` and its secret parts replaced by the redacted URL."""
    parts = urlsplit(url)
    text = text.replace(url, redact(url))
    for secret in (parts.password, parts.query, parts.username):
        if secret:
            text = text.replace(secret, "***")
    return text


def fetch_file(ref: str, sha256: str | None, offline: bool | None = None) -> tuple[Path, str]:
    """A weights file named by a path or URL, verified against its (required) sha256.

    Local paths and file:// URLs are used in place. Anything else fsspec opens (https://,
    s3:// with s3fs installed, memory://, ...) is downloaded once into the torch hub cache,
    under a name that starts with the sha256, so it is found again offline and never
    confused with another file of the same name; nothing unverified is left in the cache.
    `${NAME}` in `ref` is read from the environment; credentials never reach a log, an error
    message or a file name (they are redacted).
    """
    import fsspec.core

    shown = redact(ref)
    if not sha256:
        raise WeightsError(f"model.sha256 is required for weights from a file or URL ({shown}); "
                           "compute it with `sha256sum <file>`")
    url = expand_env(ref)
    if has_credentials(ref):
        log.warning("model.weights carries credentials in its URL: they are redacted in every output, but "
                    "params.yaml and dvc.lock hold them; write them as ${ENV_VAR} instead")
    protocol, location = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        path = Path(os.path.expanduser(location))
        return path, verify_sha256(path, sha256)
    name = Path(urlsplit(url).path).name or "weights.pt"
    cached = hub_dir() / "checkpoints" / f"{sha256.lower()[:16]}-{name}"
    if cached.is_file():
        return cached, verify_sha256(cached, sha256)
    if is_offline(offline):
        raise WeightsError(f"{shown} is not in the cache ({cached}) and downloads are off (offline). Copy the file "
                           f"to {cached}, or set model.weights to a local copy (same model.sha256)")
    _download(url, cached, sha256)
    return cached, sha256.lower()


def _download(url: str, dest: Path, sha256: str) -> None:
    import fsspec

    shown = redact(url)
    log.info("downloading %s -> %s", shown, dest)
    try:
        with atomic_path(dest) as tmp:
            # http(s): a streaming read (block_size=0), no Range requests: a plain server (python -m http.server,
            # many artifact stores) does not support them, and a download reads the file once, in order anyway
            streaming = {"block_size": 0} if urlsplit(url).scheme.lower() in ("http", "https") else {}
            with fsspec.open(url, "rb", **streaming) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            actual = sha256_file(tmp)
            if actual != sha256.lower():
                raise WeightsError(f"sha256 mismatch for {shown}: expected {sha256}, got {actual}; nothing was cached")
    except WeightsError:
        raise
    except Exception as exc:  # fsspec backends raise their own types (ImportError for a missing s3fs, ...)
        reason = scrub(f"{type(exc).__name__}: {first_line(exc)}", url)
        raise WeightsError(f"could not download {shown} ({reason}); copy the file here and set "
                           "model.weights=<its path>") from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors or torch file, never unpickling code (weights_only=True).

    timm's loader also unwraps training checkpoints ({'state_dict_ema' | 'state_dict' | 'model': ...})
    and strips DataParallel's 'module.' prefixes.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: refused to load ({first_line(exc)}); only plain tensors are accepted "
                           "(weights_only=True), never pickled code") from None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict of tensors")
    return state
