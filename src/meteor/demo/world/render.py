"""Pixels of a scene: the background, the shapes and the text (the only module that draws)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from meteor.demo.world.config import COLOURS
from meteor.demo.world.fonts import text_font, text_ink_box
from meteor.demo.world.scene import Scene, SceneObject


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``; a pure function of the scene (its ``texture_seed`` included)."""
    image = Image.fromarray(_background(scene), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    for text in scene.texts:
        left, top, _, _ = text_ink_box(text.text, text.font_size, text.stroke)
        draw.text((text.bbox[0] - left, text.bbox[1] - top), text.text, fill=scene.text_rgb,
                  font=text_font(text.font_size), anchor="la", stroke_width=text.stroke,
                  stroke_fill=scene.text_rgb)
    return image


def _background(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8: plain, lightly textured (smooth noise) or a gentle linear gradient."""
    width, height = scene.width, scene.height
    base = np.asarray(scene.background_rgb, dtype=np.float32)
    if scene.background == "plain":
        return np.broadcast_to(base.astype(np.uint8), (height, width, 3)).copy()
    rng = np.random.default_rng(scene.texture_seed)
    if scene.background == "noise":
        coarse = rng.normal(0.0, 5.0, size=(height // 6 + 2, width // 6 + 2)).astype(np.float32)
        shade = np.asarray(Image.fromarray(coarse, "F").resize((width, height), Image.Resampling.BILINEAR))
    else:  # gradient: ±10 grey levels along a random direction
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs - width / 2) * math.cos(angle) + (ys - height / 2) * math.sin(angle)
        shade = 10.0 * ramp / max(1.0, float(np.abs(ramp).max()))
    pixels = base[None, None, :] + shade[:, :, None]  # (H, W, 3)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    left, top, right, bottom = obj.bbox
    x1, y1 = right - 1, bottom - 1  # ImageDraw's boxes include their last pixel
    fill = COLOURS[obj.colour]
    cx, cy = (left + x1) / 2, (top + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((left, top, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((left, top, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, top), (x1, y1), (left, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, top), (x1, cy), (cx, y1), (left, cy)], fill=fill)
    elif obj.shape == "cross":
        bar_w, bar_h = (x1 - left) / 3, (y1 - top) / 3
        draw.rectangle((round(left + bar_w), top, round(x1 - bar_w), y1), fill=fill)
        draw.rectangle((left, round(top + bar_h), x1, round(y1 - bar_h)), fill=fill)
    elif obj.shape == "star":
        outer_x, outer_y = (x1 - left) / 2, (y1 - top) / 2
        points = []
        for k in range(10):  # five outer points, five inner ones at 0.45 of the radius
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * outer_x * math.cos(angle), cy + radius * outer_y * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
