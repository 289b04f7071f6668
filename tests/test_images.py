"""meteor.processing.images.load_image: every mode to RGB with one documented meaning, clear refusals."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from meteor.processing.images import ImageError, load_image


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --- sources ------------------------------------------------------------------------------------

def test_path_bytes_file_object_pil_and_array_agree(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    path = tmp_path / "a.png"
    image.save(path)
    with open(path, "rb") as handle:
        from_file = load_image(handle)
        assert not handle.closed  # the caller's file object stays theirs
    for loaded in (load_image(path), load_image(str(path)), load_image(path.read_bytes()), from_file,
                   load_image(image), load_image(pixels)):
        assert loaded.size == (20, 12)
        np.testing.assert_array_equal(rgb(loaded), pixels)


def test_result_is_a_new_image():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    loaded = load_image(image)
    assert loaded is not image
    loaded.putpixel((0, 0), (9, 9, 9))
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_unsupported_type_is_a_type_error():
    with pytest.raises(TypeError, match="int"):
        load_image(42)


# --- modes --------------------------------------------------------------------------------------

def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = rgb(load_image(encode(image)))
    assert tuple(out[1, 3]) == (255, 255, 255)  # fully transparent: white, not black
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert all(120 <= v <= 135 for v in out[0, 1])  # half-transparent black over white: mid-grey


def test_la_is_composited_on_white():
    image = Image.new("LA", (3, 3), (0, 0))
    assert tuple(rgb(load_image(image))[1, 1]) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black, index 1 green
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    out = rgb(load_image(encode(image)))
    assert tuple(out[3, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 255, 0)


def test_greyscale_and_one_bit():
    grey = Image.new("L", (3, 3), 77)
    assert tuple(rgb(load_image(encode(grey)))[0, 0]) == (77, 77, 77)
    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((1, 1), 1)
    out = rgb(load_image(encode(bits)))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_sixteen_bit_gradient_keeps_order_and_full_range(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (4, 1))
    image = Image.fromarray(gradient)
    assert image.mode.startswith("I;16")
    path = tmp_path / "deep.png"
    image.save(path)
    for source in (image, path, image.convert("I"), gradient):
        row = rgb(load_image(source))[0, :, 0]
        assert row[0] == 0 and row[-1] == 255
        assert (np.diff(row) >= 0).all()
        assert len(np.unique(row)) > 200  # scaled, not clipped to a few values


def test_float_image_and_float_array():
    ramp = np.linspace(0, 1, 50, dtype=np.float32)[None, :].repeat(3, axis=0)
    for source in (Image.fromarray(ramp), ramp, ramp.astype(np.float64)):
        row = rgb(load_image(source))[0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    eight_bit_scale = Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32))  # Pillow's convert("F")
    assert tuple(rgb(load_image(eight_bit_scale))[0, 0]) == (200, 200, 200)


def test_cmyk_and_ycbcr():
    assert tuple(rgb(load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    assert tuple(rgb(load_image(Image.new("CMYK", (2, 2), (255, 0, 0, 0))))[0, 0]) == (0, 255, 255)
    cmyk_jpeg = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = rgb(cmyk_jpeg)[4, 4]
    assert r > 200 and g < 60 and b < 60
    ycbcr = Image.new("RGB", (2, 2), (10, 120, 240)).convert("YCbCr")
    assert all(abs(a - b) <= 3 for a, b in zip(rgb(load_image(ycbcr))[0, 0], (10, 120, 240)))


def test_exif_orientation_6_is_applied_and_the_file_is_untouched(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    shown = load_image(path)
    assert shown.size == (20, 40)
    out = rgb(shown)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the stored left (red) is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == mtime


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert tuple(rgb(load_image(buffer.getvalue()))[3, 3]) == (255, 0, 0)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 3), (5, 7, 4)])
def test_array_shapes(shape):
    out = load_image(np.full(shape, 255, dtype=np.uint8))
    assert out.size == (7, 5) and rgb(out).min() == 255


def test_bool_array():
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 1] = True
    out = rgb(load_image(mask))
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0


# --- refusals -----------------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "cat.jpg"
    with pytest.raises(ImageError, match="not found.*cat.jpg"):
        load_image(missing)


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")


def test_non_image_bytes_and_files(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"<html><body>404 Not Found</body></html>")
    fake = tmp_path / "page.jpg"
    fake.write_text("<html>rate limited</html>")
    with pytest.raises(ImageError, match="page.jpg"):
        load_image(fake)


def test_truncated_jpeg_is_refused():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_truncated_png_is_refused():
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    with pytest.raises(ImageError, match="re-download"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused_where_another_library_relaxed_pillow(monkeypatch, fmt):
    # lmms-eval sets ImageFile.LOAD_TRUNCATED_IMAGES = True when it is imported (lmms_eval/api/task.py).
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is put back
    assert load_image(data).size == (64, 64)


def test_pixel_limit_and_pillows_decompression_bomb(monkeypatch):
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="10,000 pixels.*max_pixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    assert load_image(data, max_pixels=None).size == (100, 100)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(np.zeros((100, 100), dtype=np.uint8), max_pixels=50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses above twice this
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=None)


@pytest.mark.parametrize("array, words", [
    (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
    (np.zeros((3, 5, 6), dtype=np.uint8), "not an image"),
    (np.zeros((3, 8, 8), dtype=np.uint8), "transpose"),
    (np.full((2, 2, 3), 2.0), "divide by 255"),
    (np.full((2, 2), np.nan, dtype=np.float32), "NaN"),
    (np.full((2, 2), 300, dtype=np.int64), "ambiguous"),
    (np.zeros((2, 2), dtype=np.complex64), "dtype"),
])
def test_bad_arrays_are_refused(array, words):
    with pytest.raises(ImageError, match=words):
        load_image(array)


def test_small_integer_arrays_are_accepted():
    assert tuple(rgb(load_image(np.full((2, 2, 3), 200, dtype=np.int64)))[0, 0]) == (200, 200, 200)
