"""Real photographs from scikit-image's data module, written as RGB PNG files.

Only images that ship inside scikit-image's wheel are used (its other data sets are fetched on demand
through pooch, which this command never does); they are read as files from the installed
distribution, never through ``skimage.data`` functions, and checked against the SHA-256 that
scikit-image's own registry (``skimage/data/_registry.py``) gives them. Licences are those that
scikit-image's documentation of each image states."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from meteor.adapters.real_weights.sources import Source, sha256_file

_PKG = "scikit-image"


def _photo(file: str, sha256: str, licence: str, origin: str) -> Source:
    return Source(package=_PKG, version=None, path=f"skimage/data/{file}", sha256=sha256, licence=licence,
                  origin=origin)


PHOTOS: dict[str, Source] = {
    "astronaut": _photo("astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                        "public domain (NASA; no known copyright restrictions)",
                        "the astronaut Eileen Collins, NASA Great Images database"),
    "chelsea": _photo("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                      "CC0 (photographer: Stefan van der Walt)", "Chelsea the cat"),
    "coffee": _photo("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
                     "CC0 (photographer: Rachel Michetti)", "a cup of coffee, courtesy of Pikolo Espresso Bar"),
    "rocket": _photo("rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
                     "public domain (released by SpaceX)", "launch of DSCOVR on a Falcon 9, SpaceX Photos"),
    "motorcycle": _photo("motorcycle_left.png", "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
                         "not stated by scikit-image (Middlebury 2014 stereo benchmark, Scharstein et al.)",
                         "a motorcycle, left view of a Middlebury 2014 stereo pair downsampled 4x"),
    "camera": _photo("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
                     "CC0 (photographer: Lav Varshney)", "a photographer with a camera (grey-level)"),
    "coins": _photo("coins.png", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
                    "no known copyright restrictions (Brooklyn Museum Collection)",
                    "Greek coins from Pompeii (grey-level)"),
    "hubble_deep_field": _photo("hubble_deep_field.jpg",
                                "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
                                "public domain (NASA)", "the Hubble eXtreme Deep Field, HubbleSite"),
    "immunohistochemistry": _photo("ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
                                   "no known copyright restrictions (Center for Microscopy and Molecular Imaging)",
                                   "colonic glands, IHC staining with hematoxylin counterstaining"),
}
"""The photographs written, by output name. Not included: ``horse`` (a clip-art silhouette, not a
photograph), textures (brick, grass, gravel) and scanned text."""


def write_photos(out: Path) -> list[dict]:
    """Each photograph as ``out/<name>.png`` (RGB, no metadata); returns the manifest's rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, source in PHOTOS.items():
        path = source.locate()
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        target = out / f"{name}.png"
        # No ICC profile, text chunks or timestamps: the file is a function of the pixels alone.
        rgb.save(target, format="PNG", optimize=False)
        rows.append({"name": name, "file": target.name, "width": rgb.width, "height": rgb.height,
                     "sha256": sha256_file(target), "source": source.record()})
    return rows
