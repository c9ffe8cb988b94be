"""Synthetic scenes: deterministic, captioned by a small grammar that tells the truth, written in
every output format locally and to S3, and from the `gitcap scenes` command."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline import scenes as scenes_module
from pipeline.scenes import (
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    encode_image,
    generate_scenes,
    make_scene,
    vocabulary,
    write_scenes,
)


def _alternatives(words) -> str:
    return "|".join(re.escape(word) for word in words)


OBJECT = rf"a ({_alternatives(SIZES)}) ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)})"
ONE_OBJECT = re.compile(rf"{OBJECT} in the ({_alternatives(POSITIONS)})")
TWO_OBJECTS = re.compile(rf"{OBJECT} ({_alternatives(RELATIONS)}) {OBJECT}")


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """conftest's fresh bucket. Its `new_bucket` sends region us-east-1 as a LocationConstraint,
    which S3 (and moto) reject; until that is fixed there, make the bucket without a region."""
    try:
        return s3_server.new_bucket()
    except OSError:
        import uuid

        import s3fs

        options = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": s3_server.endpoint}}
        name = f"test-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(name)
        return name


@pytest.fixture(scope="module")
def many_scenes():
    return list(generate_scenes(500, seed=7))


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_bytes_and_caption():
    for index in (0, 1, 123):
        first, second = make_scene(5, index), make_scene(5, index)
        assert first.caption == second.caption
        assert first.metadata == second.metadata
        assert first.key == second.key == f"{index:09d}"
        for image_format in ("jpeg", "png"):
            assert encode_image(first.image, image_format) == encode_image(second.image, image_format)


def test_different_seeds_give_different_scenes():
    seed_a = [make_scene(1, index) for index in range(20)]
    seed_b = [make_scene(2, index) for index in range(20)]
    assert [s.caption for s in seed_a] != [s.caption for s in seed_b]
    assert all(a.image.tobytes() != b.image.tobytes() for a, b in zip(seed_a, seed_b))


def test_scene_does_not_depend_on_order_or_count():
    in_order = list(generate_scenes(12, seed=3))
    backwards = [make_scene(3, index) for index in reversed(range(12))][::-1]
    later_start = list(generate_scenes(4, seed=3, start=8))
    for scene, other in zip(in_order, backwards):
        assert (scene.caption, scene.image.tobytes()) == (other.caption, other.image.tobytes())
    for scene, other in zip(in_order[8:], later_start):
        assert (scene.key, scene.caption, scene.image.tobytes()) == (other.key, other.caption, other.image.tobytes())


# --- captions ----------------------------------------------------------------------------------


def test_every_caption_parses_with_the_grammar_and_uses_only_the_vocabulary(many_scenes):
    words = set(vocabulary())
    for scene in many_scenes:
        caption = scene.caption
        assert caption == caption.lower() and not caption.endswith(".")
        assert ONE_OBJECT.fullmatch(caption) or TWO_OBJECTS.fullmatch(caption), caption
        assert set(caption.split()) <= words, caption


def test_captions_name_the_objects_in_the_metadata(many_scenes):
    for scene in many_scenes:
        objects = scene.metadata["objects"]
        names = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
        if len(objects) == 1:
            assert scene.caption == f"{names[0]} in the {objects[0]['position']}"
        else:
            # The small object is always named first: one true caption per image.
            assert [o["size"] for o in objects] == ["small", "large"]
            assert scene.caption == f"{names[0]} {scene.metadata['relation']} {names[1]}"


def test_relations_hold_clearly_in_the_object_positions(many_scenes):
    pairs = [s.metadata for s in many_scenes if s.metadata["relation"]]
    assert pairs
    for meta in pairs:
        small, large = meta["objects"]
        # Spelled out here rather than read from RELATIONS, so that table cannot be wrong unnoticed.
        axis, small_first = {
            "to the left of": ("x", True),
            "to the right of": ("x", False),
            "above": ("y", True),
            "below": ("y", False),
        }[meta["relation"]]
        across = "y" if axis == "x" else "x"
        first, second = (small, large) if small_first else (large, small)
        # Apart along the relation's axis, with a gap: no overlap, no doubt which comes first.
        assert first[axis] + first["extent"] < second[axis] - second["extent"], meta
        # Mostly aligned across it, so "above" never reads as "to the left of".
        assert abs(small[across] - large[across]) < 0.5 * (second[axis] - first[axis]), meta


def test_lone_object_lies_in_the_named_part_of_the_image(many_scenes):
    singles = [s.metadata for s in many_scenes if not s.metadata["relation"]]
    assert singles
    for meta in singles:
        (obj,) = meta["objects"]
        fx, fy = obj["x"] / meta["width"], obj["y"] / meta["height"]
        position = obj["position"]
        if position == "center":
            assert 0.4 < fx < 0.6 and 0.4 < fy < 0.6, meta
        else:
            vertical, horizontal = position.split()
            assert (fy < 0.4) if vertical == "top" else (fy > 0.6), meta
            assert (fx < 0.4) if horizontal == "left" else (fx > 0.6), meta


def test_scenes_vary_over_every_shape_colour_size_relation_position_and_texture(many_scenes):
    objects = [o for s in many_scenes for o in s.metadata["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {o["position"] for o in objects if "position" in o} == set(POSITIONS)
    assert {s.metadata["relation"] for s in many_scenes} == set(RELATIONS) | {None}
    assert {s.metadata["background"]["texture"] for s in many_scenes} == set(TEXTURES)
    counts = Counter(len(s.metadata["objects"]) for s in many_scenes)
    assert counts[1] > 150 and counts[2] > 150
    assert len({s.caption for s in many_scenes}) > 0.8 * len(many_scenes)


# --- images ------------------------------------------------------------------------------------


def test_objects_are_visible_at_their_recorded_positions(many_scenes):
    for scene in many_scenes[:200]:
        pixels = np.asarray(scene.image).astype(int)
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(scene.image)))).astype(int)
        for obj in scene.metadata["objects"]:
            colour = np.array(COLOURS[obj["colour"]])
            x, y = round(obj["x"]), round(obj["y"])
            assert (pixels[y, x] == colour).all(), (scene.caption, obj)
            # Still there after JPEG: the 3x3 patch around the centre averages to the colour.
            patch = decoded[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            assert np.abs(patch - colour).max() < 30, (scene.caption, obj, patch)
            # The extent is right: just outside the object's box is background, not the object.
            outside = pixels[y, min(x + round(obj["extent"]) + 2, scene.image.width - 1)]
            if len(scene.metadata["objects"]) == 1:
                assert not (outside == colour).all(), (scene.caption, obj)


def test_backgrounds_are_muted_so_every_object_colour_stands_out(many_scenes):
    for scene in many_scenes:
        pixels = np.asarray(scene.image).astype(int)
        background = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.metadata["objects"]:
            x, y, r = obj["x"], obj["y"], obj["extent"] + 2
            background[max(0, int(y - r)) : int(y + r) + 1, max(0, int(x - r)) : int(x + r) + 1] = False
        for rgb in COLOURS.values():
            distance = np.linalg.norm(pixels[background] - np.array(rgb), axis=1)
            assert distance.min() > 60, (scene.caption, rgb)


def test_image_size_is_fixed_or_drawn_from_a_range():
    assert make_scene(0, 0).image.size == (96, 96)
    assert make_scene(0, 0, size=(160, 64)).image.size == (160, 64)
    sizes = {make_scene(0, index, size=(64, 48), max_size=(128, 96)).image.size for index in range(30)}
    assert len(sizes) > 10
    assert all(64 <= w <= 128 and 48 <= h <= 96 for w, h in sizes)
    for index in range(40):  # two large objects still fit side by side in the smallest image
        scene = make_scene(9, index, size=(32, 32))
        assert ONE_OBJECT.fullmatch(scene.caption) or TWO_OBJECTS.fullmatch(scene.caption)


@pytest.mark.parametrize("size, max_size", [((8, 8), None), ((96,), None), ((96, 96), (64, 64))])
def test_bad_sizes_are_rejected(size, max_size):
    with pytest.raises(ValueError):
        make_scene(0, 0, size=size, max_size=max_size)


# --- writing -----------------------------------------------------------------------------------


def _check_tar(data: bytes, expected_indices: list[int], seed: int) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    names = [name for name, _ in members]
    keys = [f"{index:09d}" for index in expected_indices]
    # Grouped by key, in order, three files each: what WebDataset readers expect.
    assert names == [f"{key}.{ext}" for key in keys for ext in ("jpg", "txt", "json")]
    files = dict(members)
    for index, key in zip(expected_indices, keys):
        scene = make_scene(seed, index)
        assert files[f"{key}.txt"].decode() == scene.caption
        record = json.loads(files[f"{key}.json"])
        assert record["key"] == key and record["caption"] == scene.caption and record["index"] == index
        assert Image.open(io.BytesIO(files[f"{key}.jpg"])).size == scene.image.size


def _check_parquet(table, expected_indices: list[int], seed: int) -> None:
    assert table.column_names[:3] == ["key", "image", "caption"]
    assert {"seed", "index", "width", "height", "background", "relation"} <= set(table.column_names)
    for row, index in zip(table.to_pylist(), expected_indices, strict=True):
        scene = make_scene(seed, index)
        assert row["key"] == f"{index:09d}" and row["caption"] == scene.caption
        assert row["seed"] == seed and row["index"] == index
        assert row["image"]["path"] == f"{row['key']}.jpg"
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == scene.image.size
        assert json.loads(row["metadata"]) == json.loads(json.dumps(scene.metadata))


def test_webdataset_shards_are_img2dataset_tars_grouped_by_key(tmp_path):
    files = write_scenes(str(tmp_path / "wds"), count=25, seed=4, shard_size=10)
    assert files == [str(tmp_path / "wds" / f"{n:05d}.tar") for n in range(3)]
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    for shard, path in enumerate(files):
        indices = list(range(shard * 10, min(shard * 10 + 10, 25)))
        _check_tar(open(path, "rb").read(), indices, seed=4)


def test_written_shards_are_identical_across_runs(tmp_path):
    first = write_scenes(str(tmp_path / "a"), count=6, seed=4)
    second = write_scenes(str(tmp_path / "b"), count=6, seed=4)
    assert open(first[0], "rb").read() == open(second[0], "rb").read()


def test_parquet_shards_hold_hugging_face_image_structs(tmp_path):
    files = write_scenes(str(tmp_path), count=7, seed=2, format="parquet", shard_size=4)
    assert [p.rsplit("/", 1)[-1] for p in files] == ["00000.parquet", "00001.parquet"]
    table = pq.read_table(files[0])
    assert str(table.schema.field("image").type) == "struct<bytes: binary, path: string>"
    _check_parquet(table, [0, 1, 2, 3], seed=2)
    _check_parquet(pq.read_table(files[1]), [4, 5, 6], seed=2)


def test_images_format_writes_each_image_with_caption_and_metadata_sidecars(tmp_path):
    files = write_scenes(str(tmp_path), count=3, seed=8, format="images", image_format="png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.rsplit("/", 1)[-1] for f in files)
    for index in range(3):
        scene, key = make_scene(8, index), f"{index:09d}"
        image = Image.open(tmp_path / f"{key}.png")
        assert np.array_equal(np.asarray(image), np.asarray(scene.image))  # PNG is lossless
        assert (tmp_path / f"{key}.txt").read_text() == scene.caption
        assert json.loads((tmp_path / f"{key}.json").read_text())["caption"] == scene.caption


def _fail_on_third_image(monkeypatch) -> None:
    real_encode, calls = scenes_module.encode_image, []

    def failing_encode(image, image_format="jpeg"):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_encode(image, image_format)

    monkeypatch.setattr(scenes_module, "encode_image", failing_encode)


def test_a_failed_write_leaves_no_partial_files(tmp_path, monkeypatch):
    _fail_on_third_image(monkeypatch)
    with pytest.raises(RuntimeError):
        write_scenes(str(tmp_path), count=5, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_bad_write_settings_are_rejected_before_writing(tmp_path):
    for settings in [{"format": "csv"}, {"image_format": "gif"}, {"shard_size": 0}, {"size": (10, 10)}]:
        with pytest.raises(ValueError):
            write_scenes(str(tmp_path / "out"), count=3, seed=0, **settings)
    assert not (tmp_path / "out").exists()


def test_webdataset_and_parquet_stream_to_s3(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    out = f"s3://{s3_bucket}/scenes"
    tars = write_scenes(out, count=5, seed=6, shard_size=3, storage_options=s3_server.storage_options)
    assert tars == [f"{out}/00000.tar", f"{out}/00001.tar"]
    _check_tar(fs.cat_file(tars[1]), [3, 4], seed=6)

    out = f"s3://{s3_bucket}/scenes-parquet"
    parquets = write_scenes(out, count=5, seed=6, format="parquet", storage_options=s3_server.storage_options)
    assert parquets == [f"{out}/00000.parquet"]
    with fs.open(parquets[0], "rb") as f:
        _check_parquet(pq.read_table(f), list(range(5)), seed=6)


def test_a_failed_write_to_s3_publishes_no_partial_object(s3_server, s3_bucket, monkeypatch):
    _fail_on_third_image(monkeypatch)
    with pytest.raises(RuntimeError):
        write_scenes(f"s3://{s3_bucket}/scenes", count=5, seed=0, storage_options=s3_server.storage_options)
    assert s3_server.filesystem().find(s3_bucket) == []


# --- command line ------------------------------------------------------------------------------


def test_cli_writes_scenes_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["scenes", str(out), "--count", "5", "--seed", "3", "--format", "parquet", "--size", "64x48"]) == 0
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1 and "5 scenes" in summary and str(out) in summary
    table = pq.read_table(out / "00000.parquet")
    assert table.column("caption").to_pylist() == [make_scene(3, i, size=(64, 48)).caption for i in range(5)]
    assert set(table.column("width").to_pylist()) == {64}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "csv"], "invalid choice"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--size", "10x10"], "32..4096"),
    ],
)
def test_cli_rejects_bad_arguments_with_status_2_and_a_message(tmp_path, capsys, args, message):
    assert main(["scenes", str(tmp_path / "out"), "--count", "2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
