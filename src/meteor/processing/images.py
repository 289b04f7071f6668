"""Turn whatever a user or a dataset hands us into one RGB ``PIL.Image``, or refuse it clearly.

Real datasets hold EXIF-rotated phone photos, transparent PNGs, 16-bit scans, CMYK print files,
animated GIFs, truncated downloads and HTML error pages saved as ``.jpg``. ``load_image`` gives
every one of them a single, documented meaning, and refuses the unusable ones with an
``ImageError`` that names the source and what to do, so a data loader can catch, count and skip
them instead of training on garbage.

Policies (the same for files, bytes, file objects, PIL images and numpy arrays):

- EXIF orientation is applied (``ImageOps.exif_transpose``): the model sees what a viewer shows.
- Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on **white**:
  transparent pixels are usually blank paper (documents, logos, charts), and black would turn
  black text on a transparent background into a black rectangle.
- 16-bit greyscale (``I;16*``) is scaled to 8 bits by 255/65535, keeping order and full range
  (clipping to 255 would make almost every pixel white). ``I`` (32-bit) images holding 16-bit
  data are treated the same way; any other range is stretched linearly from its min to its max.
- Float ``F`` images: values in [0, 1] are read as fractions, values in [0, 255] as 8-bit levels
  (Pillow's own ``convert("F")`` convention), anything else is stretched from min to max.
- Multi-frame files (GIF, APNG, TIFF): the first frame.
- CMYK, YCbCr, 1-bit, greyscale and palette images are converted by Pillow.

The user's file is only ever opened for reading. Truncated files are refused even where another
library in the process has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` (lmms-eval does, on
import): the decode runs with that switch off and puts it back as it was. ``PIL.Image.MAX_IMAGE_PIXELS``
is Pillow's own hard limit and still applies, checked before ours.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest image (width × height) accepted by default: Pillow's own decompression-bomb warning
threshold, turned into a clear refusal. No view the model sees needs more (a 6-slice image is
downsampled to 7 × 336² ≈ 0.8 megapixels), and decoding 89.5 megapixels already takes ~270 MB."""

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO, Image.Image,
                    np.ndarray]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Float arrays a hair outside [0, 1] (resampling overshoot, rounding) are clipped rather than
# refused; half an 8-bit level is invisible after quantisation.
_FLOAT_TOLERANCE = 0.5 / 255
_STRICT_DECODE = threading.Lock()  # one decode at a time flips Pillow's process-wide switch


class ImageError(ValueError):
    """An image that cannot be used; the message names the source and what to do instead."""


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as a new RGB image (the module docstring gives the policies).

    Args:
        source: a path (``str`` or ``os.PathLike``), encoded file bytes, a binary file object
            (read from its current position, left open), a ``PIL.Image.Image`` (used at its current
            frame; never modified), or a numpy array H×W, H×W×1 (grey), H×W×2 (grey + alpha),
            H×W×3 (RGB) or H×W×4 (RGBA) of uint8, uint16 (full 0-65535 range), bool, float in
            [0, 1], or another integer type whose values lie in 0-255.
        max_pixels: refuse images with more than this many pixels (width × height), checked from
            the header before decoding; ``None`` disables this check (Pillow's own limit remains).

    Returns:
        A new ``PIL.Image.Image`` in mode "RGB", independent of any file.

    Raises:
        ImageError: missing or unreadable file, not an image, truncated or corrupt data, zero
            size, more than ``max_pixels`` pixels, or an unusable array.
        TypeError: ``source`` is of a type not listed above.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")
    if isinstance(source, Image.Image):
        name = f"<PIL {source.mode} image {source.width}×{source.height}>"
        _check_size(source.size, name, max_pixels)
        _decode(source, name)
        return _to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = repr(path)
        if not os.path.exists(path):
            raise ImageError(f"image file not found: {name} (resolved from {os.getcwd()!r}); check "
                             "the path and the image folder the dataset's paths are relative to")
        if os.path.isdir(path):
            raise ImageError(f"{name} is a directory, not an image file; pass the path of a file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"image file {name} is empty (0 bytes): re-download or re-extract it")
        return _open(path, name, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        if not data:
            raise ImageError("got 0 bytes of image data: the download or read returned nothing")
        return _open(io.BytesIO(data), name, max_pixels)
    if hasattr(source, "read"):
        name = repr(getattr(source, "name", "<file object>"))
        return _open(source, name, max_pixels)
    raise TypeError(f"cannot load an image from a {type(source).__name__}; pass a path, bytes, a "
                    "binary file object, a PIL image or a numpy array")


# --- files ----------------------------------------------------------------------------------------

def _open(fp: str | BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Open, check the header size, decode fully, convert; ``fp`` is only read."""
    try:
        image = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} is refused by Pillow as a possible decompression bomb ({err}); if "
                         "you trust it, raise PIL.Image.MAX_IMAGE_PIXELS, or downscale the file") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name} is not an image Pillow can read (unknown format or damaged header); "
                         "check that it is a real image file and not, e.g., a saved HTML error page "
                         "or a text file") from err
    except PermissionError as err:
        raise ImageError(f"cannot read {name}: permission denied; fix the file's permissions") from err
    except MemoryError:
        raise
    except Exception as err:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageError(f"{name} has a corrupt image header ({type(err).__name__}: {err}); "
                         "re-download or re-encode it") from err
    # The context manager closes the file only if Pillow opened it: a caller's file object stays open.
    with image:
        _check_size(image.size, name, max_pixels)
        _decode(image, name)
        return _to_rgb(image, name)


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}×{height} pixels): there is nothing to see; "
                         "drop this sample or fix the file")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{name} is {width}×{height} = {width * height:,} pixels, above the limit "
                         f"of {max_pixels:,} (a guard against decompression bombs); if you trust it, "
                         "pass a larger max_pixels to load_image, or downscale the file first")


def _decode(image: Image.Image, name: str) -> None:
    """Decode the pixels now: truncation and corruption only show up here, not in ``open``."""
    try:
        with _STRICT_DECODE:
            relaxed = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = relaxed
    except MemoryError:
        raise
    except Exception as err:  # truncated JPEG: OSError; broken PNG: SyntaxError/OSError; ...
        if "truncated" in str(err).lower():
            state, fix = "truncated", "re-download or re-extract it"
        else:
            state, fix = "corrupt", "re-download or re-encode it"
        raise ImageError(f"{name} is {state} and cannot be decoded ({type(err).__name__}: {err}); "
                         f"{fix}, or drop this sample") from err


# --- modes ----------------------------------------------------------------------------------------

def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """A new RGB image from a decoded image of any mode (module docstring: policies)."""
    image = _apply_exif_orientation(image, name)  # a new image from here on: the input is untouched
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return Image.fromarray(_integer_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_image_to_uint8(np.asarray(image), name)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:  # e.g. LAB or HSV: Pillow has no direct conversion
        raise ImageError(f"{name} is in colour mode {mode!r}, which Pillow cannot convert to RGB "
                         f"({err}); re-save it as an RGB image (JPEG or PNG)") from err


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as err:  # a damaged EXIF block must not cost us an otherwise good image
        warnings.warn(f"{name}: could not read its EXIF orientation ({type(err).__name__}: {err}); "
                      "using the pixels as stored", stacklevel=3)
        return image.copy()


def _integer_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16/32-bit integers → (H, W) uint8: 16-bit range scaled by 255/65535, else min–max."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode in _SIXTEEN_BIT_MODES or (low >= 0 and high <= 65535):
        return np.rint(values * (255 / 65535)).astype(np.uint8)
    return _stretch(values, low, high)


def _float_image_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """(H, W) float32 of a Pillow "F" image → (H, W) uint8 (module docstring: range policy)."""
    if not np.isfinite(values).all():
        raise ImageError(f"{name} is a float image containing NaN or infinity; replace them (e.g. "
                         "numpy.nan_to_num) before loading")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1 + _FLOAT_TOLERANCE:
        return np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0-255 (a constant image becomes black)."""
    span = high - low
    if span == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255 / span)).astype(np.uint8)


# --- numpy arrays ---------------------------------------------------------------------------------

def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    """(H, W) or (H, W, C) with C in 1..4 → RGB image (alpha composited on white)."""
    name = f"<array of shape {array.shape} and dtype {array.dtype}>"
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4)):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = " It looks channels-first: pass array.transpose(1, 2, 0)."
        raise ImageError(f"{name} is not an image: expected H×W (grey) or H×W×C with C = 1 (grey), "
                         f"2 (grey + alpha), 3 (RGB) or 4 (RGBA).{hint}")
    _check_size((array.shape[1], array.shape[0]), name, max_pixels)
    pixels = np.ascontiguousarray(_array_to_uint8(array, name))
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return _to_rgb(Image.fromarray(pixels), name)  # mode L, LA, RGB or RGBA from the shape


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.rint(array.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name} contains NaN or infinity; replace them (numpy.nan_to_num) "
                             "before loading")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ImageError(f"{name} has values in [{low:g}, {high:g}] but float images must lie in "
                             "[0, 1]; divide by 255 if it holds 8-bit levels, or pass uint8/uint16")
        return np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        raise ImageError(f"{name} has integer values in [{low}, {high}], which is ambiguous; pass "
                         "uint8 (0-255), uint16 (0-65535) or float in [0, 1]")
    raise ImageError(f"{name}: dtype {array.dtype} is not a pixel type; pass uint8, uint16, bool or "
                     "float in [0, 1]")
