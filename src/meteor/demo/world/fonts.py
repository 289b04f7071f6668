"""Text metrics and fonts: the font Pillow ships (``ImageFont.load_default(size=...)``, FreeType),
so nothing is downloaded and the same Pillow gives the same glyphs."""

from __future__ import annotations

import functools

from PIL import ImageFont

Box = tuple[int, int, int, int]


@functools.lru_cache(maxsize=None)
def text_font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType, so its default font has one fixed size; "
                           "the world needs scalable text: install a Pillow wheel with FreeType")
    return font


@functools.lru_cache(maxsize=None)
def cap_height(size: int) -> int:
    """Ink height in pixels of an upper-case letter or digit at font ``size``."""
    left, top, right, bottom = text_font(size).getbbox("H", anchor="la")
    return bottom - top


@functools.lru_cache(maxsize=None)
def font_size_for_cap_height(height: float) -> int:
    """Smallest font size whose capitals are at least ``height`` pixels tall."""
    size = max(4, int(height))
    while cap_height(size) < height:
        size += 1
    return size


@functools.lru_cache(maxsize=None)
def text_ink_box(text: str, size: int, stroke: int = 0) -> Box:
    """(left, top, right, bottom) of ``text``'s ink relative to its "la" anchor (right/bottom
    exclusive), as drawn by ``render_scene`` with an outline of ``stroke`` pixels."""
    return text_font(size).getbbox(text, anchor="la", stroke_width=stroke)  # type: ignore[return-value]
