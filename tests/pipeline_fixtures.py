"""Shared by the pipeline tests: a tiny model folder, a private Ray, inputs odd and broken, and
readers of the output. Import the fixtures into a test module to use them."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.job import CaptionJob
from pipeline.scenes import make_scene
from tests.test_sources import tar_bytes  # noqa: F401  (one tar writer for all tests)

# --- a model ----------------------------------------------------------------------------------


def save_tiny_model(path: Path) -> str:
    """A tiny random GIT (32 px, two layers) with its processor: fast, and its captions vary."""
    from tests.tiny_checkpoint import save_tiny_checkpoint
    from tests.tiny_processor import TINY_VOCAB, save_tiny_processor

    save_tiny_checkpoint(path, eos_bias=3.0, vocab_size=len(TINY_VOCAB))  # every token a prompt may use
    save_tiny_processor(path, image_size=32)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray for the module (start-up takes seconds: share it)."""
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def job(input_path, output_path, model, **sections) -> CaptionJob:
    """A CaptionJob with small batches; `sections` override whole sections or single keys."""
    spec = {
        "input": {"path": input_path, "format": "webdataset"},
        "output": {"path": output_path},
        "model": {"path": model},
        "compute": {"batch_size": 8, "shards_per_wave": 1},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return CaptionJob.from_dict(spec)


# --- inputs -----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def scene_jpeg(index: int, size=(48, 40)) -> bytes:
    return encode(make_scene(0, index, size=size).image, "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a huge size with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_zoo() -> dict[str, tuple[str, bytes, object]]:
    """name -> (extension, bytes, expected): expected is (width, height) for images that must be
    captioned, or the error reason code for those that must become error rows."""
    base = make_scene(0, 7, size=(60, 40)).image
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 60x40 stored, 40x60 shown
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = Image.fromarray(np.arange(60 * 40, dtype=np.uint16).reshape(40, 60) * 27)
    jpeg = encode(base, "JPEG")
    return {
        "good": ("jpg", jpeg, (60, 40)),
        "grayscale": ("png", encode(base.convert("L"), "PNG"), (60, 40)),
        "palette": ("png", encode(base.convert("P"), "PNG"), (60, 40)),
        "cmyk": ("jpg", encode(base.convert("CMYK"), "JPEG"), (60, 40)),
        "rgba": ("png", encode(rgba, "PNG"), (60, 40)),
        "sixteen_bit": ("png", encode(sixteen, "PNG"), (60, 40)),
        "exif_rotated": ("jpg", encode(base, "JPEG", exif=exif), (40, 60)),
        "animated": ("gif", animated.getvalue(), (60, 40)),
        "zero_bytes": ("jpg", b"", "empty"),
        "truncated": ("jpg", jpeg[: len(jpeg) // 2], "truncated"),
        "html": ("jpg", b"<!doctype html><html><body>404 Not Found</body></html>", "not_an_image"),
        "unsupported": ("jpg", encode(Image.new("RGB", (16, 16)), "EPS"), "unsupported_format"),
        "bomb": ("png", png_header_only(60_000, 60_000), "decompression_bomb"),
    }


def scene_shard(start: int, count: int) -> bytes:
    """A WebDataset shard of scenes start..start+count-1 (jpg, txt caption, json)."""
    members = []
    for index in range(start, start + count):
        key = f"{index:06d}"
        members += [(f"{key}.jpg", scene_jpeg(index)), (f"{key}.txt", f"scene {index}".encode()),
                    (f"{key}.json", json.dumps({"index": index}).encode())]
    return tar_bytes(members)


def write_scene_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(shards):
        path = folder / f"{n:05d}.tar"
        path.write_bytes(scene_shard(n * per_shard, per_shard))
        paths.append(str(path))
    return paths


# --- the output -------------------------------------------------------------------------------


def read_output(path: str, storage_options: dict | None = None):
    """The output folder as readers see it: every committed data file, as one pandas frame."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.invalidate_cache()
    files = sorted(f for f in fs.ls(root, detail=False) if f.endswith(".parquet"))
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    if not tables:
        import pandas as pd

        return pd.DataFrame(columns=["key", "caption", "error"])
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def assert_each_key_once(frame, expected_keys) -> None:
    counts = frame["key"].value_counts()
    duplicated = counts[counts > 1]
    assert duplicated.empty, f"keys written more than once: {list(duplicated.index[:5])}"
    missing = set(expected_keys) - set(frame["key"])
    assert not missing, f"{len(missing)} keys missing, e.g. {sorted(missing)[:5]}"
    extra = set(frame["key"]) - set(expected_keys)
    assert not extra, f"unexpected keys: {sorted(extra)[:5]}"


def process_session_members(session_id: int) -> list[int]:
    """PIDs of the live processes in a session (a killed run's Ray workers keep its session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: session id
            pids.append(int(entry))
    return pids
