"""Synthetic captioning scenes: simple shapes on plain or textured backgrounds, with true captions.

Scene `index` of `seed` is always the same image and caption: each scene draws from its own random
generator, seeded by (seed, index), so scenes can be made in any order, in parallel or one at a time.
A tiny GIT captioner trained on them is what the demo, the tests and the benchmarks run.

Captions come from a small fixed grammar, lowercase, without a final period:

    one object:   a {size} {colour} {shape} in the {position}
    two objects:  a small {colour} {shape} {relation} a large {colour} {shape}

The small object is always named first. Otherwise "A to the left of B" and "B to the right of A"
would both be true of one image, and no model could match the caption exactly.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.storage import Folder

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated or extreme colours; backgrounds are muted greys, so an object always stands out.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Half the object's width, as a fraction of the image's shorter side: large is about twice small.
SIZES = {"small": (0.10, 0.12), "large": (0.20, 0.23)}
_LOW, _MID, _HIGH = (0.18, 0.32), (0.44, 0.56), (0.68, 0.82)
# Where a lone object's centre lies: ranges of fractions of (width, height).
POSITIONS = {
    "top left": (_LOW, _LOW),
    "top right": (_HIGH, _LOW),
    "bottom left": (_LOW, _HIGH),
    "bottom right": (_HIGH, _HIGH),
    "center": (_MID, _MID),
}
# relation -> (axis it runs along, whether the small object comes first along that axis)
RELATIONS = {
    "to the left of": ("x", True),
    "to the right of": ("x", False),
    "above": ("y", True),
    "below": ("y", False),
}
TEXTURES = ("plain", "noise", "stripes", "checker", "gradient")
FORMATS = ("webdataset", "parquet", "images")
# image format -> (file extension, PIL save options). Full-resolution chroma keeps small
# objects' colours true in JPEG.
IMAGE_FORMATS = {"jpeg": ("jpg", {"quality": 90, "subsampling": 0}), "png": ("png", {})}

DEFAULT_SIZE = (96, 96)
# Two large objects side by side, with margins and a gap, need about 0.84 of the shorter side.
MIN_SIDE, MAX_SIDE = 32, 4096
_MARGIN, _GAP = 0.03, 0.08  # fractions of the shorter side
# Off-axis offset allowed between related objects, as a fraction of their on-axis distance:
# "above" must never look like "to the left of".
_MAX_SKEW = 0.3


@dataclass(frozen=True)
class Scene:
    """One image and its true caption.

    `key` is the scene index zero-padded to nine digits, like img2dataset keys. `metadata` holds
    seed, index, width, height, background {texture, colour} and relation (None for one object),
    and objects: [{shape, colour, size, x, y, extent, position (one object only)}], where (x, y)
    is the centre in pixels and extent is half the object's width.
    """

    key: str
    image: Image.Image
    caption: str
    metadata: dict[str, Any]


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    phrases = ["a in the", *SIZES, *COLOURS, *SHAPES, *POSITIONS, *RELATIONS]
    return sorted({word for phrase in phrases for word in phrase.split()})


def make_scene(
    seed: int,
    index: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_size: tuple[int, int] | None = None,
) -> Scene:
    """Scene `index` of `seed`. Its (width, height) is `size`, or drawn from [size, max_size]."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    _check_size(size, max_size)
    rng = np.random.default_rng([seed, index])
    width, height = size
    if max_size is not None:
        width = int(rng.integers(size[0], max_size[0] + 1))
        height = int(rng.integers(size[1], max_size[1] + 1))
    short = min(width, height)

    pixels, background = _background(rng, width, height)
    if rng.random() < 0.5:
        objects = [_new_object(rng, _choice(rng, list(SIZES)), short)]
        objects[0]["position"] = _place_alone(rng, objects[0], width, height)
        caption = f"{_describe(objects[0])} in the {objects[0]['position']}"
        relation = None
    else:
        objects = [_new_object(rng, "small", short), _new_object(rng, "large", short)]
        relation = _place_pair(rng, *objects, width, height)
        caption = f"{_describe(objects[0])} {relation} {_describe(objects[1])}"

    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    for obj in objects:
        obj.update({name: round(float(obj[name]), 1) for name in ("x", "y", "extent")})
    metadata = {
        "seed": seed,
        "index": index,
        "width": width,
        "height": height,
        "background": background,
        "objects": objects,
        "relation": relation,
    }
    return Scene(key=f"{index:09d}", image=image, caption=caption, metadata=metadata)


def generate_scenes(
    count: int,
    seed: int,
    start: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_size: tuple[int, int] | None = None,
) -> Iterator[Scene]:
    """Scenes start, start + 1, ... start + count - 1 of `seed`."""
    for index in range(start, start + count):
        yield make_scene(seed, index, size, max_size)


def encode_image(image: Image.Image, image_format: str = "jpeg") -> bytes:
    """The image as JPEG or PNG file bytes (the same bytes for the same image, every time)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper(), **IMAGE_FORMATS[image_format][1])
    return buffer.getvalue()


def write_scenes(
    out: str,
    count: int,
    seed: int,
    format: str = "webdataset",
    shard_size: int = 1000,
    image_format: str = "jpeg",
    storage_options: dict[str, Any] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_size: tuple[int, int] | None = None,
) -> list[str]:
    """Write scenes 0..count-1 of `seed` under `out` (a local folder or any fsspec URL).

    "webdataset": `{out}/00000.tar`, ... with `KEY.jpg`, `KEY.txt` (caption), `KEY.json` per scene;
    "parquet": `{out}/00000.parquet`, ... with key, image {bytes, path}, caption and metadata columns;
    "images": `{out}/KEY.jpg` with `KEY.txt` and `KEY.json` beside it.
    Returns the URIs of the written files, in the form `out` was given.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    if count < 0 or shard_size < 1:
        raise ValueError(f"need count >= 0 and shard_size >= 1, got count={count}, shard_size={shard_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _check_size(size, max_size)

    folder = Folder(out, storage_options, staging=None)  # no bookkeeping folder among the scenes
    folder.fs.makedirs(folder.root, exist_ok=True)
    names: list[str] = []
    for shard, start in enumerate(range(0, count, shard_size)):
        scenes = generate_scenes(min(shard_size, count - start), seed, start, size, max_size)
        if format == "images":
            for scene in scenes:
                for name, data in _sample_files(scene, image_format):
                    folder.write_bytes(name, data)
                    names.append(name)
            continue
        name = f"{shard:05d}.tar" if format == "webdataset" else f"{shard:05d}.parquet"
        with folder.publish(name) as f:
            if format == "webdataset":
                _write_tar(f, scenes, image_format)
            else:
                _write_parquet(f, scenes, image_format)
        names.append(name)
    return [f"{out.rstrip('/')}/{name}" for name in names]


# --- drawing ---------------------------------------------------------------------------------


def _check_size(size: tuple[int, int], max_size: tuple[int, int] | None) -> None:
    for name, value in (("size", size), ("max_size", max_size)):
        if value is None:
            continue
        if len(value) != 2 or not all(MIN_SIDE <= side <= MAX_SIDE for side in value):
            raise ValueError(f"{name} must be (width, height), each {MIN_SIDE}..{MAX_SIDE} pixels, got {value}")
    if max_size is not None and (max_size[0] < size[0] or max_size[1] < size[1]):
        raise ValueError(f"max_size {max_size} is smaller than size {size}")


def _choice(rng: np.random.Generator, options: list | tuple):
    """A random element as a plain Python value (rng.choice would return numpy scalars)."""
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, dict]:
    """A muted, faintly tinted grey, plain or with a mild texture, as an (height, width, 3) array."""
    texture = _choice(rng, TEXTURES)
    base = rng.uniform(95, 165) + rng.uniform(-12, 12, 3)
    amplitude = rng.uniform(8, 16)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if texture == "plain":
        shade = np.zeros((height, width))
    elif texture == "noise":
        shade = rng.normal(0, amplitude / 2, (height, width))
    elif texture == "stripes":
        shade = amplitude * np.sign(np.sin(2 * math.pi * along / rng.uniform(6, 16)))
    elif texture == "checker":
        cell = int(rng.integers(6, 17))
        shade = amplitude * (((xx // cell + yy // cell) % 2) * 2 - 1)
    else:  # gradient
        shade = amplitude * ((along - along.min()) / max(np.ptp(along), 1) * 2 - 1)
    pixels = np.clip(base + shade[..., None], 0, 255).round().astype(np.uint8)
    return pixels, {"texture": texture, "colour": [int(c) for c in base.round()]}


def _new_object(rng: np.random.Generator, size: str, short_side: int) -> dict[str, Any]:
    return {
        "shape": _choice(rng, SHAPES),
        "colour": _choice(rng, list(COLOURS)),
        "size": size,
        "x": 0.0,
        "y": 0.0,
        "extent": rng.uniform(*SIZES[size]) * short_side,
    }


def _place_alone(rng: np.random.Generator, obj: dict, width: int, height: int) -> str:
    position = _choice(rng, list(POSITIONS))
    inset = obj["extent"] + _MARGIN * min(width, height)
    for axis, fractions, length in zip("xy", POSITIONS[position], (width, height)):
        obj[axis] = float(np.clip(rng.uniform(*fractions) * length, inset, length - inset))
    return position


def _place_pair(rng: np.random.Generator, small: dict, large: dict, width: int, height: int) -> str:
    """Place both objects apart along the relation's axis, and close across it; return the relation."""
    relation = _choice(rng, list(RELATIONS))
    axis, small_first = RELATIONS[relation]
    across = "y" if axis == "x" else "x"
    length = {"x": width, "y": height}
    margin, gap = _MARGIN * min(width, height), _GAP * min(width, height)

    # Along the axis: margin, first object, gap, second object, margin; the slack left over is
    # spread at random before, between and after them.
    first, second = (small, large) if small_first else (large, small)
    slack = length[axis] - 2 * margin - 2 * (first["extent"] + second["extent"]) - gap
    before, between = sorted(rng.uniform(0, slack, 2))
    first[axis] = margin + first["extent"] + before
    second[axis] = first[axis] + first["extent"] + gap + (between - before) + second["extent"]

    # Across it: the large object anywhere, the small one near its line. The small one fits
    # wherever the large one does, so this range is never empty.
    large[across] = rng.uniform(margin + large["extent"], length[across] - margin - large["extent"])
    reach = _MAX_SKEW * (second[axis] - first[axis])
    low = max(margin + small["extent"], large[across] - reach)
    high = min(length[across] - margin - small["extent"], large[across] + reach)
    small[across] = rng.uniform(low, high)
    return relation


def _describe(obj: dict) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x, y, r = obj["x"], obj["y"], obj["extent"]
    fill = COLOURS[obj["colour"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "cross":
        arm = r / 3  # thick arms, so a small cross is still a cross and not two lines
        draw.rectangle([x - r, y - arm, x + r, y + arm], fill=fill)
        draw.rectangle([x - arm, y - r, x + arm, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "star":
        # Inner radius 0.45: a fat star keeps its points readable at small sizes.
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# --- writing ---------------------------------------------------------------------------------


def _sample_files(scene: Scene, image_format: str) -> list[tuple[str, bytes]]:
    """A scene's files as img2dataset names them: KEY.jpg, KEY.txt (caption), KEY.json."""
    extension = IMAGE_FORMATS[image_format][0]
    record = {"key": scene.key, "caption": scene.caption, **scene.metadata}
    return [
        (f"{scene.key}.{extension}", encode_image(scene.image, image_format)),
        (f"{scene.key}.txt", scene.caption.encode()),
        (f"{scene.key}.json", json.dumps(record, sort_keys=True).encode()),
    ]


def _write_tar(f: BinaryIO, scenes: Iterable[Scene], image_format: str) -> None:
    # Stream mode ("w|") never seeks, so the tar can go straight into an object-store upload.
    with tarfile.open(fileobj=f, mode="w|") as tar:
        for scene in scenes:
            for name, data in _sample_files(scene, image_format):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # fixed, so the same scenes always make the same shard bytes
                tar.addfile(info, io.BytesIO(data))


_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face `Image`


def _write_parquet(f: BinaryIO, scenes: Iterable[Scene], image_format: str) -> None:
    extension = IMAGE_FORMATS[image_format][0]
    rows = [
        {
            "key": scene.key,
            "image": {"bytes": encode_image(scene.image, image_format), "path": f"{scene.key}.{extension}"},
            "caption": scene.caption,
            "seed": scene.metadata["seed"],
            "index": scene.metadata["index"],
            "width": scene.metadata["width"],
            "height": scene.metadata["height"],
            "background": scene.metadata["background"]["texture"],
            "relation": scene.metadata["relation"],
            "metadata": json.dumps(scene.metadata, sort_keys=True),
        }
        for scene in scenes
    ]
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("image", _IMAGE_STRUCT),
            ("caption", pa.string()),
            ("seed", pa.int64()),
            ("index", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("background", pa.string()),
            ("relation", pa.string()),
            ("metadata", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
