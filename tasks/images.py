"""Image decoding shared by ingest, validation, training, evaluation and serving.

One function turns any supported file into the model's input, so training and serving can
never preprocess differently:
- EXIF orientation is applied;
- 16-bit images are scaled to 8 bits, CMYK/palette/grayscale become RGB, alpha is dropped
  after compositing onto black;
- the image is resized (squashed) to `size x size` with bilinear antialiasing. Squashing keeps
  the whole field of view, which matters for defect inspection where a crop can cut a defect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """A file that is not a usable image; the message names the file and the reason."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB: 16-bit and float scaled to 8 bits, palette expanded, alpha composited onto black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _name(source: str | Path | BinaryIO) -> str:
    return str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "") or "<upload>")


def open_rgb(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file (path or open binary file) fully into an upright RGB image, or raise ImageError
    naming it and saying why."""
    path = _name(source)
    source = Path(source) if isinstance(source, str) else source
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"{path}: {img.width}x{img.height} exceeds the pixel limit {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: decompression bomb guard ({exc})") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot decode ({reason})") from None


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 array (3, size, size), the model's input contract."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_for_model(source: str | Path | BinaryIO, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file -> uint8 (3, size, size): the only decode path of training, evaluation, export and serving."""
    return resize_square(open_rgb(source, max_pixels), size)


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Facts about one file for the manifest; never raises for a bad image (it is recorded)."""
    path = Path(path)
    row = {"width": 0, "height": 0, "mode": "", "channels": 0, "bytes": 0, "sha256": "", "decodes_ok": False, "error": ""}
    try:
        data = path.read_bytes()
    except OSError as exc:
        row["error"] = f"unreadable ({exc.strerror or exc})"
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        with Image.open(path) as img:
            row["mode"] = img.mode
            row["channels"] = len(img.getbands())
            row["width"], row["height"] = img.size
    except Exception as exc:
        row["error"] = f"not an image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return row
    try:
        row["width"], row["height"] = open_rgb(path, max_pixels).size  # upright size
        row["decodes_ok"] = True
    except ImageError as exc:
        row["error"] = str(exc).split(": ", 1)[-1]
    return row
