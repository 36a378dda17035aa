"""One decode path for training and serving: every input mode ends as the same RGB uint8 tensor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.images import ImageError, load_for_model, open_rgb


@pytest.fixture
def gray(tmp_path):
    arr = (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)
    return arr


def test_grayscale_rgba_palette_and_16bit_convert_consistently(tmp_path, gray):
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # 16-bit, same picture
    ref = load_for_model(tmp_path / "l.png", 32)
    assert ref.shape == (3, 32, 32) and ref.dtype == np.uint8
    assert (ref[0] == gray).all() and (ref[0] == ref[1]).all() and (ref[1] == ref[2]).all()
    for name in ("rgba.png", "p.png", "i16.png"):
        np.testing.assert_allclose(load_for_model(tmp_path / name, 32).astype(int), ref.astype(int), atol=1, err_msg=name)


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_rgb(tmp_path / "a.png"))
    assert (out[:4] == 200).all() and (out[4:] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_pixel_limit_and_garbage_name_the_file(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="big.png.*exceeds the pixel limit"):
        open_rgb(tmp_path / "big.png", max_pixels=1000)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="text.png: cannot decode"):
        open_rgb(tmp_path / "text.png")
