"""The images of a request: inline data URLs, or files under the folder the operator named.

The server fetches nothing: an http(s) URL is refused with what to send instead. A local path (or a
``file://`` URL) is read only when the server runs with ``--image-root`` and the path, with every
link followed, lies inside that folder. Every image is decoded by ``meteor.processing.images.load_image``,
which reads its size from the header and refuses one above ``max_pixels`` before decoding it (a
decompression bomb), and refuses truncated or corrupt data. The server raises Pillow's own guard to
its ``--max-image-pixels`` when that is higher (``allow_pixels``), and names that flag whichever guard
refuses an image.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from meteor.processing.images import ImageError, load_image
from meteor.serve.protocol import APIError, ImagePart, invalid

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<base64>;base64)?,(?P<data>.*)",
                       re.DOTALL)


def allow_pixels(max_pixels: int) -> None:
    """Pillow refuses images above twice ``PIL.Image.MAX_IMAGE_PIXELS`` before any check of ours:
    raise its limit to the server's, so that ``--max-image-pixels`` is the one that decides."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


class ImageResolver:
    """Turns an image URL of a request into an RGB image, or an ``APIError`` naming the part."""

    def __init__(self, root: str | Path | None, max_pixels: int):
        self.root = None if root is None else Path(root).resolve()
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--image-root {root}: no such folder")
        self.max_pixels = max_pixels

    def load(self, part: ImagePart) -> Image.Image:
        url = part.url.strip()
        scheme = urlparse(url).scheme.lower() if not re.match(r"^[A-Za-z]:[\\/]", url) else ""
        if scheme in ("http", "https", "ftp"):
            raise invalid(f"{part.param}: this server fetches nothing, so it does not download {url[:80]!r}; "
                          f"send the image inline as a data:image/png;base64,... URL", part.param, "image_url_refused")
        if scheme == "data":
            return self._decode(self._data(url, part), part)
        if scheme not in ("", "file"):
            raise invalid(f"{part.param}: unsupported URL scheme {scheme!r}; send a data:image/...;base64 URL",
                          part.param, "invalid_image_url")
        return self._decode(self._file(unquote(urlparse(url).path) if scheme == "file" else url, part), part)

    def _data(self, url: str, part: ImagePart) -> bytes:
        match = _DATA_URL.fullmatch(url)
        if match is None or not match["base64"]:
            raise invalid(f"{part.param}: a data URL must read data:image/<type>;base64,<data>", part.param,
                          "invalid_image_url")
        if match["mime"] and not match["mime"].lower().startswith("image/"):
            raise invalid(f"{part.param}: the data URL holds {match['mime']}, not an image", part.param,
                          "invalid_image_url")
        try:
            return base64.b64decode(re.sub(r"\s+", "", match["data"]), validate=True)
        except (binascii.Error, ValueError) as err:
            raise invalid(f"{part.param}: the data URL's base64 does not decode ({err})", part.param,
                          "invalid_base64") from None

    def _file(self, name: str, part: ImagePart) -> bytes:
        if self.root is None:
            raise invalid(f"{part.param}: local image paths are refused unless the server is started with "
                          f"--image-root FOLDER; send the image inline as a data:image/...;base64 URL",
                          part.param, "image_path_refused")
        path = (self.root / name).resolve()    # an absolute name replaces the root, then must lie in it
        if not path.is_relative_to(self.root):
            raise invalid(f"{part.param}: {name!r} is outside the image root this server reads", part.param,
                          "image_path_refused")
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise invalid(f"{part.param}: cannot read {name!r} under the image root ({type(err).__name__})",
                          part.param, "image_not_found") from None

    def _decode(self, data: bytes, part: ImagePart) -> Image.Image:
        try:
            return load_image(data, max_pixels=self.max_pixels)
        except ImageError as err:
            text = str(err)
            if "above the limit" in text or "decompression bomb" in text:
                # Pillow's own guard refuses some before ours: either way it is the server's limit
                # that the client meets, and its operator's flag that moves it
                raise invalid(f"{part.param}: the image is {_pixels(text)}, above this server's limit of "
                              f"{self.max_pixels:,} pixels (meteor serve --max-image-pixels); send a smaller "
                              f"image", part.param, "invalid_image") from None
            raise invalid(f"{part.param}: {err}", part.param, "invalid_image") from None


def _pixels(message: str) -> str:
    """The image's size as ``load_image`` or Pillow's decompression-bomb guard wrote it."""
    found = re.search(r"(\d+)×(\d+) = ([\d,]+) pixels", message)
    if found:
        return f"{found[1]}×{found[2]} = {found[3]} pixels"
    found = re.search(r"Image size \((\d+) pixels\)", message)
    return f"{int(found[1]):,} pixels" if found else "too many pixels"


__all__ = ["APIError", "ImageResolver"]
