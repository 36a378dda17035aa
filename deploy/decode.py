"""Uploaded images decoded with bounded memory: what one upload may cost, and how many run at once.

A small file can decode to a huge image (a 208 KB PNG of 7000x7000 RGBA is 196 MB of pixels), and the training
decode path (`tasks.images`: full decode, then copies to composite alpha and convert to RGB) multiplies that by 4-5.
Serving many such uploads at once took a server from 284 MB to 4 GB (issue 32). So for serving:

1. `inspect` reads only the header (formats the pipeline reads: PNG, JPEG, BMP, WebP, TIFF), refuses more than
   `max_pixels`, and estimates the bytes the decode will hold at its peak (`Upload.cost`).
2. An image at least 4x the model's input size in a dimension is decoded *reduced*: JPEG at a DCT scale (Pillow's
   `draft`: 1/2, 1/4 or 1/8, never below 4x the input size), other formats box-reduced (`Image.reduce`) right
   after decoding, strip by strip, so no full-size copy is ever made (converting a palette, or premultiplying alpha
   as `reduce` does, happens one 8 MiB strip at a time); then the shared steps (EXIF orientation, to RGB, the
   bilinear squash to the input size). Smaller images go through `tasks.images.load_for_model` unchanged, so their
   input is exactly the one training and `finetune predict` compute.
3. `DecodeBudget` lets decodes run while their costs fit `capacity` bytes together (first come, first served);
   an image that alone needs more is refused (413) and a request that waits too long gets 503.
4. Memory goes back to the system after a large decode: `tune_malloc` makes glibc serve large blocks with mmap
   (returned on free), and `release_memory` trims the heap after a decode of over 32 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import io
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.images import ImageError, load_for_model, resize_square, to_rgb

log = logging.getLogger("deploy.decode")
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")  # tasks.images.IMAGE_EXTENSIONS (JPEG opens MPO, phone JPEGs, too)
ORIENTATION = 0x0112
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # what ImageOps.exif_transpose does, applied after the reduction
COPIES_EXACT = 5     # the shared path holds the decoded image and up to 4 converted copies (alpha composite, RGB)
STRIP_BYTES = 8 << 20  # rows reduced at a time: a strip, its converted copy and premultiplied copy stay near this
TRIM_ABOVE = 32 << 20
KEEP = 4  # a reduced image keeps at least this many times the input size per side (then the bilinear squash)


class DecodeRefused(ImageError):
    """An image that alone needs more decode memory than the server allows."""


@dataclass
class Upload:
    """An upload whose header was read: its lazy image, what its decode costs, and how it will be decoded."""

    name: str
    data: bytes
    image: Image.Image
    cost: int                # bytes held at the decode's peak
    exact: bool              # decoded by the shared training path (small enough), else reduced
    reduce: tuple[int, int]  # box-reduction factors after decoding (after the JPEG scale, if any)


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel in Pillow's memory (RGB is stored in 4)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def inspect(data: bytes, name: str, size: int, max_pixels: int) -> Upload:
    """Read the header, check the pixel limit, plan the decode (ImageError says what is wrong with the file)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: decompression bomb guard ({exc})") from None
    except Exception as exc:  # PIL raises OSError (UnidentifiedImageError), SyntaxError, ValueError...
        reason = str(exc).splitlines()[0].split(" <")[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{name}: cannot decode ({reason})") from None
    if width * height > max_pixels:
        image.close()
        raise ImageError(f"{name}: {width}x{height} exceeds the pixel limit {max_pixels}")
    exact = width < 4 * size and height < 4 * size
    coefficients = 0
    if not exact and image.format in ("JPEG", "MPO"):
        if image.info.get("progressive") or image.info.get("progression"):  # libjpeg holds every DCT block
            coefficients = _coefficient_bytes(image, width, height)
        image.draft(image.mode, (KEEP * size, KEEP * size))
    reduce = (max(1, image.size[0] // (KEEP * size)), max(1, image.size[1] // (KEEP * size)))
    decoded = image.size[0] * image.size[1] * pixel_bytes(image.mode)
    if exact:
        cost = decoded * COPIES_EXACT
    else:  # the decoded image, strips being reduced, then the reduced image and its copies
        cost = decoded + 4 * STRIP_BYTES + decoded // (reduce[0] * reduce[1]) * COPIES_EXACT
    if image.format == "WEBP":
        cost += width * height * 4  # libwebp decodes into a buffer of its own first
    return Upload(name, data, image, cost + coefficients, exact, reduce)


def _coefficient_bytes(image, width: int, height: int) -> int:
    """A progressive JPEG's DCT coefficients, which libjpeg keeps for the whole image whatever the output scale:
    64 two-byte values per 8x8 block of each component at its sampling (4:4:4 when the header does not say)."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    hmax, vmax = max(max(h for _, h, _, _ in layers), 1), max(max(v for _, _, v, _ in layers), 1)
    total = 0
    for _, h, v, _ in layers:
        columns, rows = -(-width * max(h, 1) // hmax), -(-height * max(v, 1) // vmax)
        total += -(-columns // 8) * -(-rows // 8) * 64 * 2
    return total


def decode(upload: Upload, size: int, max_pixels: int) -> np.ndarray:
    """The planned decode -> uint8 (3, size, size) (call it in a thread, holding `upload.cost` of the budget)."""
    try:
        if upload.exact:
            upload.image.close()
            return load_for_model(_named(upload), size, max_pixels)
        return _decode_reduced(upload, size)
    except ImageError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{upload.name}: cannot decode ({reason})") from None
    finally:
        upload.image.close()
        if upload.cost > TRIM_ABOVE:
            release_memory()


def _named(upload: Upload) -> io.BytesIO:
    buffer = io.BytesIO(upload.data)
    buffer.name = upload.name
    return buffer


def _decode_reduced(upload: Upload, size: int) -> np.ndarray:
    image = upload.image
    image.load()
    orientation = image.getexif().get(ORIENTATION, 1)  # read before reducing: the reduced image has no metadata
    small = _reduce_in_strips(image, *upload.reduce)
    image.close()
    rgb = to_rgb(small)
    if orientation in TRANSPOSE:
        rgb = rgb.transpose(TRANSPOSE[orientation])
    return resize_square(rgb, size)


def _reduce_in_strips(image: Image.Image, fx: int, fy: int) -> Image.Image:
    """`image` box-reduced by (fx, fy), a strip of rows at a time (the same pixels as one `reduce`, without its
    full-size premultiplied copy), palette and bilevel strips converted first (averaging palette indices is
    meaningless), 16-bit strips through 32-bit (`reduce` takes no 16-bit mode)."""
    width, height = image.size
    rows = fy * max(1, STRIP_BYTES // (width * 4 * fy))
    out = None
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        if strip.mode in ("P", "PA"):
            strip = strip.convert("RGBA" if strip.mode == "PA" or "transparency" in strip.info else "RGB")
        elif strip.mode == "1" or strip.mode.startswith("I;16"):
            strip = strip.convert("L" if strip.mode == "1" else "I")
        reduced = strip.reduce((fx, fy)) if (fx, fy) != (1, 1) else strip
        if out is None:
            out = Image.new(reduced.mode, (-(-width // fx), -(-height // fy)))
        out.paste(reduced, (0, top // fy))
    return out.convert("I;16") if image.mode.startswith("I;16") else out


class DecodeBudget:
    """At most `capacity` bytes of decoding in flight, first come, first served (on the event loop)."""

    def __init__(self, capacity: int, wait_s: float = 60.0):
        self.capacity, self.wait_s, self.used = capacity, wait_s, 0
        self.peak = 0  # the most ever held at once (tests and the benchmark read it)
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, cost: int, name: str):
        if cost > self.capacity:
            raise DecodeRefused(f"{name}: decoding it needs {_mib(cost)} of memory, over the server's limit of "
                                f"{_mib(self.capacity)} (--decode-memory-mb); send a smaller image")
        if self._waiting or self.used + cost > self.capacity:
            future = asyncio.get_running_loop().create_future()
            entry = (cost, future)
            self._waiting.append(entry)
            try:
                await asyncio.wait_for(asyncio.shield(future), self.wait_s)
            except BaseException:
                if future.done() and not future.cancelled():  # granted just as the wait ended: give it back
                    self._release(cost)
                else:
                    future.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(entry)
                    self._grant()
                raise
        else:
            self._take(cost)
        try:
            yield
        finally:
            self._release(cost)

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    def _release(self, cost: int) -> None:
        self.used -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            cost, future = self._waiting[0]
            if future.done():  # gave up waiting
                self._waiting.popleft()
                continue
            if self.used + cost > self.capacity:
                return
            self._waiting.popleft()
            self._take(cost)
            future.set_result(None)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# ---- glibc: give freed memory back -----------------------------------------------------------------

def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


LIBC = _libc()
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 8 << 20) -> bool:
    """Blocks of `mmap_threshold` bytes or more come from mmap and go back to the system when freed (glibc only).
    A fixed threshold also stops glibc raising it after the first large free (its default dynamic behaviour keeps
    up to 32 MiB blocks, Pillow's 16 MiB image blocks among them, in the heap for good)."""
    return bool(LIBC and LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def release_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim; nothing elsewhere)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
