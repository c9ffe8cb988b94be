"""list_shards / read_shard: every path form, every format, and damaged inputs, locally and on S3."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources
from pipeline.listing import expand_braces, list_shards
from pipeline.sources import Record, Shard, ShardError, SourceError, read_shard, shard_stem

JPEG = b"\xff\xd8\xff\xe0fake-jpeg-bytes"  # sources never decode: any bytes stand for an image
PNG = b"\x89PNG\r\n\x1a\nfake-png-bytes"


def tar_bytes(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def sample_members(key: str, caption: str = "a cat") -> list[tuple[str, bytes]]:
    """One sample as img2dataset writes it."""
    meta = {"url": f"http://example.com/{key}.jpg", "caption": caption}
    return [
        (f"{key}.jpg", JPEG + key.encode()),
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.txt", caption.encode()),
    ]


def write_shard(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes([m for key in keys for m in sample_members(key)]))
    return path


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def hf_image_table(n: int, with_id: bool = False) -> pa.Table:
    """A Hugging Face `datasets` image column: struct<bytes: binary, path: string>."""
    images = [{"bytes": JPEG + str(i).encode(), "path": f"img{i}.jpg"} for i in range(n)]
    columns = {"image": images, "caption": [f"caption {i}" for i in range(n)]}
    if with_id:
        columns["id"] = [f"id-{i}" for i in range(n)]
    return pa.table(columns)


def read_all(shard: Shard, **kwargs) -> list[Record]:
    return list(read_shard(shard, **kwargs))


def uris(shards: list[Shard]) -> list[str]:
    return [s.uri for s in shards]


# --- brace expansion ----------------------------------------------------------------------------


def test_brace_range_keeps_zero_padding():
    assert expand_braces("s/{00000..00003}.tar") == [f"s/{i:05d}.tar" for i in range(4)]


def test_brace_range_without_padding_and_with_a_step_and_downwards():
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{0..10..5}") == ["0", "5", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]


def test_comma_lists_several_and_nested_braces():
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("x{a,{b,c}d}") == ["xa", "xbd", "xcd"]
    assert expand_braces("{train,test}-{00..01}") == ["train-00", "train-01", "test-00", "test-01"]


def test_braces_that_do_not_expand_stay_literal():
    assert expand_braces("a/{name}/x") == ["a/{name}/x"]
    assert expand_braces("a/{b") == ["a/{b"]
    assert expand_braces("{x}{1..2}") == ["{x}1", "{x}2"]


def test_absurd_brace_range_is_refused():
    with pytest.raises(SourceError, match="expands to over"):
        expand_braces("{0..99999999999}")


@pytest.mark.parametrize("pattern, count", [
    ("{0..3}{000..999}{000..999}", 4_000_000),  # each range small, their product not
    ("{{a,b},{c,d}}" * 30, 4**30),  # nested lists: counted without walking every path
], ids=["ranges", "nested lists"])
def test_brace_pattern_over_the_limit_is_refused_before_it_is_expanded(pattern, count):
    start = time.monotonic()
    with pytest.raises(SourceError, match=rf"expands to over 1000000 paths \({count}\)"):
        expand_braces(pattern)
    assert time.monotonic() - start < 0.5  # expanding the first took 6.7 s and 626 MB


def test_brace_pattern_at_the_limit_expands_in_order():
    paths = expand_braces("{0..999}{000..999}")
    assert len(paths) == 1_000_000 and paths[:2] == ["0000", "0001"] and paths[-1] == "999999"


# --- listing: path forms ------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    for i in range(3):
        write_shard(tmp_path / "shards" / f"{i:05d}.tar", [f"{i}{j:04d}" for j in range(2)])
    (tmp_path / "shards" / "00000_stats.json").write_text("{}")  # img2dataset writes these beside
    return tmp_path / "shards"


def test_brace_range_lists_shards_in_order(shard_dir):
    shards = list_shards(f"{shard_dir}/{{00000..00002}}.tar", "webdataset")
    assert uris(shards) == [str(shard_dir / f"{i:05d}.tar") for i in range(3)]
    assert all(s.format == "webdataset" and s.files == () for s in shards)


def test_brace_range_with_a_missing_shard_names_it(shard_dir):
    with pytest.raises(SourceError, match=r"1 of 4 paths do not exist: .*00003\.tar"):
        list_shards(f"{shard_dir}/{{00000..00003}}.tar", "webdataset")


def test_glob_takes_only_the_formats_files(shard_dir):
    expected = [str(shard_dir / f"{i:05d}.tar") for i in range(3)]
    assert uris(list_shards(f"{shard_dir}/*", "webdataset")) == expected


def test_folder_is_searched_recursively_skipping_hidden_files(shard_dir):
    write_shard(shard_dir / "more" / "00010.tar", ["10"])
    write_shard(shard_dir / ".trash" / "00011.tar", ["11"])
    write_shard(shard_dir / "._00012.tar", ["12"])
    assert [shard_stem(u) for u in uris(list_shards(str(shard_dir), "webdataset"))] == [
        "00000", "00001", "00002", "00010",
    ]


def test_list_file_resolves_relative_lines_and_skips_comments(shard_dir, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "shards.txt").write_text(
        f"# the training shards\n\n../shards/00001.tar\n  {shard_dir / '00000.tar'}  \n../shards/more\n"
    )
    write_shard(shard_dir / "more" / "00005.tar", ["5"])
    assert uris(list_shards(str(lists / "shards.txt"), "webdataset")) == [
        str(shard_dir / "00000.tar"),
        str(shard_dir / "00001.tar"),
        str(shard_dir / "more" / "00005.tar"),
    ]


def test_list_file_with_a_byte_order_mark_reads_its_first_line(shard_dir):
    listing = shard_dir / "list.txt"
    listing.write_bytes("\ufeff00000.tar\r\n00001.tar\r\n".encode("utf-8"))  # as Notepad saves it
    assert uris(list_shards(str(listing), "webdataset")) == [str(shard_dir / "00000.tar"), str(shard_dir / "00001.tar")]


def test_local_paths_are_normalised_so_one_file_is_listed_once(shard_dir):
    paths = [str(shard_dir), f"{shard_dir}/./00001.tar", f"{shard_dir}/sub/../00002.tar"]
    assert uris(list_shards(paths, "webdataset")) == [str(shard_dir / f"{i:05d}.tar") for i in range(3)]
    assert uris(list_shards(f"{shard_dir}//{{00000,00001}}.tar", "webdataset")) == [
        str(shard_dir / "00000.tar"), str(shard_dir / "00001.tar")]


def test_an_image_named_twice_is_one_image_with_one_key(photo_dir):
    (shard,) = list_shards([str(photo_dir), f"{photo_dir}/./b.jpg", f"{photo_dir}//2020/c.webp"], "images")
    assert [r.key for r in read_all(shard)] == ["2020/c.webp", "2020/d.gif", "a.PNG", "b.jpg"]


def test_list_file_naming_a_missing_shard_fails(shard_dir):
    listing = shard_dir.parent / "list.txt"
    listing.write_text("shards/00000.tar\nshards/00007.tar\n")
    with pytest.raises(SourceError, match=r"list\.txt: .*00007\.tar"):
        list_shards(str(listing), "webdataset")


def test_a_list_of_paths_is_merged_sorted_and_deduplicated(shard_dir):
    paths = [str(shard_dir / "00002.tar"), f"{shard_dir}/*.tar", f"file://{shard_dir}/00000.tar"]
    shards = list_shards(paths, "webdataset")
    assert uris(shards) == [str(shard_dir / f"{i:05d}.tar") for i in range(3)]


def test_gzipped_tars_count_as_webdataset_shards(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(tar_bytes(sample_members("k"), compress=True))
    (shard,) = list_shards(str(tmp_path), "webdataset")
    assert shard_stem(shard.uri) == "a"
    assert [r.key for r in read_all(shard)] == ["a/k"]


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda d: str(d / "nowhere"), "does not exist"),
        (lambda d: str(d / "nowhere" / "*.tar"), "no webdataset files found"),
        (lambda d: str(d), "no webdataset files found"),  # a folder with no tars
        (lambda d: "nosuchscheme://bucket/x.tar", "no filesystem for this URL"),
    ],
)
def test_nothing_to_read_is_a_source_error_naming_the_path(tmp_path, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(SourceError, match=message) as info:
        list_shards(path, "webdataset")
    assert path in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_format_and_empty_path_list_are_source_errors(shard_dir):
    with pytest.raises(SourceError, match="unknown input format 'tfrecord'"):
        list_shards(str(shard_dir), "tfrecord")
    with pytest.raises(SourceError, match="no input path"):
        list_shards([], "webdataset")


def test_shards_sharing_a_name_are_refused_because_keys_would_collide(tmp_path):
    write_shard(tmp_path / "a" / "00000.tar", ["1"])
    write_shard(tmp_path / "b" / "00000.tar", ["1"])
    with pytest.raises(SourceError, match="share the name '00000'"):
        list_shards(str(tmp_path), "webdataset")


# --- reading WebDataset tars --------------------------------------------------------------------


def test_webdataset_samples_carry_image_json_and_txt(shard_dir):
    shard = list_shards(str(shard_dir / "00001.tar"), "webdataset")[0]
    records = read_all(shard)
    assert [r.key for r in records] == ["00001/10000", "00001/10001"]
    first = records[0]
    assert first.data == JPEG + b"10000" and first.error is None
    assert first.source == str(shard_dir / "00001.tar")
    assert first.metadata == {
        "json": {"url": "http://example.com/10000.jpg", "caption": "a cat"},
        "txt": "a cat",
    }


def test_webdataset_metadata_oddities_never_crash(tmp_path):
    path = tmp_path / "odd.tar"
    path.write_bytes(
        tar_bytes([
            ("dir/k1.png", PNG),
            ("dir/k1.json", b"{not json"),
            ("dir/k1.cls", b"7"),  # other text members pass through under their extension
            ("dir/k1.npy", b"\x93NUMPY\x00\xff\xfe"),  # binary non-image members are ignored
            ("dir/k1.jpg", JPEG),  # a second image: the first one wins
            ("README", b"no extension: not a sample member"),
        ])
    )
    (record,) = read_all(Shard(str(path), "webdataset"))
    assert record.key == "odd/dir/k1" and record.data == PNG
    assert record.metadata["json"] == "{not json" and "json_error" in record.metadata
    assert record.metadata["cls"] == "7" and "npy" not in record.metadata


def test_sample_without_image_becomes_a_missing_image_record(tmp_path):
    path = tmp_path / "s.tar"
    no_image = [("b.json", b"{}"), ("b.txt", b"x")]
    path.write_bytes(tar_bytes(sample_members("a") + no_image + sample_members("c")))
    records = read_all(Shard(str(path), "webdataset"))
    assert [(r.key, r.error is None) for r in records] == [("s/a", True), ("s/c", True), ("s/b", False)]
    assert records[2].error.startswith("missing_image:") and records[2].data is None
    assert records[2].metadata == {"json": {}, "txt": "x"}


def test_truncated_tar_yields_what_it_could_then_a_shard_record(tmp_path):
    data = tar_bytes([m for k in ["a", "b", "c", "d"] for m in sample_members(k)])
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: 4 * 1024 + 512 + 10])  # members take 1024 bytes: cut in the 5th's data
    records = read_all(Shard(str(path), "webdataset"))
    *samples, last = records
    assert samples and all(r.error is None for r in samples)
    assert last.key == "cut/__shard__" and last.data is None
    assert last.error.startswith("shard_unreadable: ReadError")
    assert last.metadata["samples"] == len(samples)


@pytest.mark.parametrize("content", [b"", b"<html>not a tar</html>" * 50])
def test_file_that_is_not_a_tar_yields_only_a_shard_record(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    (record,) = read_all(Shard(str(path), "webdataset"))
    assert record.key == "bad/__shard__" and record.error.startswith("shard_unreadable:")


def test_missing_shard_file_yields_a_shard_record_not_an_exception(tmp_path):
    (record,) = read_all(Shard(str(tmp_path / "gone.tar"), "webdataset"))
    assert record.key == "gone/__shard__" and "FileNotFoundError" in record.error


def test_metadata_before_its_image_is_joined_in_an_ungrouped_tar(tmp_path):
    path = tmp_path / "u.tar"
    members = [("a.json", b'{"n": 1}'), ("b.json", b'{"n": 2}'), ("a.jpg", JPEG), ("b.jpg", PNG)]
    path.write_bytes(tar_bytes(members))
    records = read_all(Shard(str(path), "webdataset"))
    assert [(r.key, r.data, r.metadata) for r in records] == [
        ("u/a", JPEG, {"json": {"n": 1}}),
        ("u/b", PNG, {"json": {"n": 2}}),
    ]


def test_members_after_their_sample_was_emitted_are_reported_on_the_shard_record(tmp_path):
    path = tmp_path / "u.tar"
    path.write_bytes(tar_bytes([("a.jpg", JPEG), ("b.jpg", PNG), ("a.json", b"{}"), ("b.txt", b"late")]))
    records = read_all(Shard(str(path), "webdataset"))
    assert [r.key for r in records] == ["u/a", "u/b", "u/__shard__"]
    assert records[0].data == JPEG and records[1].data == PNG  # images still served, keys unique
    assert records[2].error.startswith("shard_ungrouped: 2 members") and "a.json" in records[2].error


def test_reading_a_tar_streams_without_keeping_member_headers(tmp_path, monkeypatch):
    path = write_shard(tmp_path / "big.tar", [f"{i:05d}" for i in range(300)])
    seen_sizes = []
    original_next = tarfile.TarFile.next

    def spying_next(self):
        seen_sizes.append(len(self.members))
        return original_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", spying_next)
    assert len(read_all(Shard(str(path), "webdataset"))) == 300
    assert max(seen_sizes) <= 2


def test_member_named_with_dots_is_an_image_by_its_last_extension(tmp_path):
    """WebDataset keys end at the first dot; what a member is, its decoders read from the last."""
    path = tmp_path / "d.tar"
    path.write_bytes(tar_bytes([("photo.2021.jpg", JPEG), ("photo.2021.txt", b"a cat"), ("x.seg.png", PNG)]))
    records = read_all(Shard(str(path), "webdataset"))
    assert [(r.key, r.data, r.error) for r in records] == [("d/photo", JPEG, None), ("d/x", PNG, None)]
    assert records[0].metadata == {"2021.txt": "a cat"}


@pytest.mark.parametrize("ext", ["jfif", "avif", "heic", "heif", "ppm", "JPG"])
def test_every_extension_decode_reads_is_an_image_member(tmp_path, ext):
    path = tmp_path / "e.tar"
    path.write_bytes(tar_bytes([(f"a.{ext}", b"\x00\x01\xff image bytes, not text")]))
    (record,) = read_all(Shard(str(path), "webdataset"))
    assert record.error is None and record.data.startswith(b"\x00\x01\xff")


@pytest.mark.parametrize("members", [
    [("a.depth.png", PNG), ("a.jpg", JPEG), ("a.seg.png", PNG)],
    [("a.jpg", JPEG), ("a.seg.png", PNG), ("a.jpeg", PNG)],
], ids=["plain after compound", "first plain"])
def test_a_plain_image_member_wins_over_compound_ones_then_the_first(tmp_path, members):
    path = tmp_path / "m.tar"
    path.write_bytes(tar_bytes(members))
    (record,) = read_all(Shard(str(path), "webdataset"))
    assert record.data == JPEG


def test_a_key_with_no_usable_image_member_is_a_missing_image_record(tmp_path):
    """Every key gives one record: one whose members are all dropped (binary, too large for
    metadata) is reported, not lost."""
    path = tmp_path / "k.tar"
    members = [("a.jpg", JPEG), ("b.npy", b"\x93NUMPY\xff\xfe"), ("c.cls", b"\xff\xfe"), ("d.jpg", PNG)]
    path.write_bytes(tar_bytes(members))
    records = read_all(Shard(str(path), "webdataset"))
    assert [(r.key, r.error) for r in records] == [
        ("k/a", None), ("k/d", None),
        ("k/b", "missing_image: no image member (found: npy)"),
        ("k/c", "missing_image: no image member (found: cls)"),
    ]


def latin1_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar written where names are latin-1 (old Windows tools): its names are not UTF-8."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_non_utf8_member_names_give_valid_keys_the_same_on_every_read(tmp_path):
    path = latin1_tar(tmp_path / "l.tar", [("caf\xe9.jpg", JPEG), ("caf\xe9.r\xe9sum\xe9", b"text"), ("ok.jpg", PNG)])
    first, second = read_all(Shard(str(path), "webdataset")), read_all(Shard(str(path), "webdataset"))
    assert [r.key for r in first] == ["l/caf\\xe9", "l/ok"] == [r.key for r in second]
    assert first[0].metadata == {"r\\xe9sum\\xe9": "text"}
    for record in first:
        record.key.encode("utf-8")


def test_image_files_with_non_utf8_names_give_valid_keys_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4)  # an error that names the file
    name = os.fsdecode(b"caf\xe9.jpg")  # how Python names a latin-1 file on a UTF-8 system
    (tmp_path / name).write_bytes(JPEG)
    (shard,) = list_shards(str(tmp_path), "images")
    (record,) = read_all(shard)
    assert record.key == "caf\\xe9.jpg" and record.source == f"{tmp_path}/{name}"  # the path it was read from
    assert record.error == f"image_too_large: caf\\xe9.jpg is {len(JPEG)} bytes"


def test_a_shard_file_whose_name_is_not_utf8_is_refused_before_any_work(tmp_path):
    write_shard(tmp_path / os.fsdecode(b"caf\xe9.tar"), ["a"])
    with pytest.raises(SourceError, match=r"caf\\xe9.tar: the name is not valid UTF-8"):
        list_shards(str(tmp_path), "webdataset")


# --- Parquet ------------------------------------------------------------------------------------


def test_parquet_hf_image_struct_with_other_columns_as_metadata(tmp_path):
    (tmp_path / "train-00000.parquet").write_bytes(parquet_bytes(hf_image_table(5), row_group_size=2))
    (shard,) = list_shards(str(tmp_path), "parquet")
    records = read_all(shard)
    # The row index runs on across row groups.
    assert [r.key for r in records] == [f"train-00000/{i}" for i in range(5)]
    assert records[3].data == JPEG + b"3" and records[3].metadata == {"caption": "caption 3"}


def test_parquet_key_comes_from_an_id_column(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(hf_image_table(3, with_id=True)))
    assert [r.key for r in read_all(Shard(str(path), "parquet"))] == ["id-0", "id-1", "id-2"]


def test_parquet_key_ending_like_a_shard_record_is_an_ordinary_sample(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(pa.table({"image": [JPEG], "key": ["x/__shard__"]})))
    (record,) = read_all(Shard(str(path), "parquet"))
    assert record.key == "x/__shard__" and record.data == JPEG and not record.shard_failure


def test_parquet_binary_column_is_found_by_name_then_by_type(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"url": ["u0", "u1"], "thumb": [b"t0", b"t1"], "jpg": pa.array([JPEG, None])})
    path.write_bytes(parquet_bytes(table))
    records = read_all(Shard(str(path), "parquet"))
    assert records[0].data == JPEG and records[0].metadata == {"url": "u0", "thumb": b"t0"}
    assert records[1].data is None and records[1].error.startswith("missing_image:")

    only_other = pa.table({"url": ["u0"], "pixels": pa.array([PNG], pa.large_binary())})
    path.write_bytes(parquet_bytes(only_other))
    assert read_all(Shard(str(path), "parquet"))[0].data == PNG


def test_parquet_image_column_can_be_named(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(pa.table({"image": [JPEG], "image_small": [PNG]})))
    assert read_all(Shard(str(path), "parquet"), image_column="image_small")[0].data == PNG


def test_parquet_struct_with_only_a_path_reads_the_file_beside_it(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(JPEG)
    path = tmp_path / "p.parquet"
    cells = [{"bytes": None, "path": "imgs/a.jpg"}, {"bytes": None, "path": "imgs/gone.jpg"}]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path.write_bytes(parquet_bytes(pa.table({"image": pa.array(cells, image_type)})))
    ok, gone = read_all(Shard(str(path), "parquet"))
    assert ok.data == JPEG
    assert gone.data is None and gone.error.startswith("missing_file:")


def test_parquet_path_cell_naming_a_file_over_the_size_limit_is_an_error_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", len(JPEG))
    (tmp_path / "small.jpg").write_bytes(JPEG)
    (tmp_path / "big.jpg").write_bytes(JPEG + b"more")
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(pa.table({"image": ["small.jpg", "big.jpg"]})))
    small, big = read_all(Shard(str(path), "parquet"), image_column="image")
    assert small.data == JPEG
    assert big.data is None and big.error == f"image_too_large: image path {tmp_path}/big.jpg is {len(JPEG) + 4} bytes"


@pytest.mark.parametrize(
    "table, image_column, expected",
    [
        (pa.table({"caption": ["x"]}), None, "no image column"),
        (pa.table({"image": [JPEG]}), "photo", "no column 'photo'"),
    ],
)
def test_parquet_without_the_image_column_yields_a_shard_record(tmp_path, table, image_column, expected):
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(table))
    (record,) = read_all(Shard(str(path), "parquet"), image_column=image_column)
    assert record.key == "p/__shard__" and record.error.startswith("shard_unreadable:")
    assert expected in record.error


def test_corrupt_parquet_yields_a_shard_record(tmp_path):
    path = tmp_path / "p.parquet"
    data = parquet_bytes(hf_image_table(3))
    path.write_bytes(data[:10] + b"\0" * (len(data) - 10))
    (record,) = read_all(Shard(str(path), "parquet"))
    assert record.key == "p/__shard__" and record.error.startswith("shard_unreadable:")


# --- plain image files --------------------------------------------------------------------------


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name in ["b.jpg", "a.PNG", "2020/c.webp", "2020/d.gif", "notes.txt", ".hidden.jpg", "._e.jpg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(JPEG + name.encode())
    return root


def test_image_folder_becomes_fixed_size_shards_in_sorted_order(photo_dir):
    shards = list_shards(str(photo_dir), "images", images_per_shard=3)
    assert uris(shards) == [f"{photo_dir}#00000", f"{photo_dir}#00001"]
    assert [len(s.files) for s in shards] == [3, 1]
    keys = [r.key for s in shards for r in read_all(s)]
    assert keys == ["2020/c.webp", "2020/d.gif", "a.PNG", "b.jpg"]


def test_image_folder_lists_every_extension_decode_reads(tmp_path):
    for name in ["a.jfif", "b.avif", "c.HEIC", "d.heif", "e.pgm", "f.2021.jpg", "g.txt"]:
        (tmp_path / name).write_bytes(JPEG)
    (shard,) = list_shards(str(tmp_path), "images")
    assert [r.key for r in read_all(shard)] == ["a.jfif", "b.avif", "c.HEIC", "d.heif", "e.pgm", "f.2021.jpg"]


def test_image_records_carry_bytes_and_their_file(photo_dir):
    (shard,) = list_shards(str(photo_dir / "b.jpg"), "images")
    (record,) = read_all(shard)
    assert (record.key, record.source) == ("b.jpg", str(photo_dir / "b.jpg"))
    assert record.data == JPEG + b"b.jpg"


def test_image_glob_keys_are_relative_to_the_fixed_part_of_the_pattern(photo_dir):
    (shard,) = list_shards(f"{photo_dir}/*/*.{{webp,gif}}", "images")
    assert [r.key for r in read_all(shard)] == ["2020/c.webp", "2020/d.gif"]


def test_image_list_file(photo_dir):
    (photo_dir / "list.txt").write_text("b.jpg\n# skipped\n2020/d.gif\n")
    (shard,) = list_shards(str(photo_dir / "list.txt"), "images")
    assert [r.key for r in read_all(shard)] == ["2020/d.gif", "b.jpg"]


def test_several_image_folders_share_one_root_so_keys_stay_unique(tmp_path):
    for folder in ["cam1", "cam2"]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "IMG_0001.JPG").write_bytes(JPEG)
    (shard,) = list_shards([str(tmp_path / "cam2"), str(tmp_path / "cam1")], "images")
    assert shard.uri == f"{tmp_path}#00000"
    assert [r.key for r in read_all(shard)] == ["cam1/IMG_0001.JPG", "cam2/IMG_0001.JPG"]


def test_image_file_over_the_size_limit_is_an_error_record_not_read(photo_dir, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", len(JPEG) + len("b.jpg"))
    (shard,) = list_shards(str(photo_dir), "images")
    records = {r.key: r for r in read_all(shard)}
    assert records["b.jpg"].data is not None and records["b.jpg"].error is None
    big = records["2020/c.webp"]
    assert big.data is None and big.error == f"image_too_large: 2020/c.webp is {len(JPEG) + 11} bytes"


def test_image_deleted_after_listing_is_a_missing_file_record(photo_dir):
    (shard,) = list_shards(str(photo_dir), "images")
    (photo_dir / "b.jpg").unlink()
    records = {r.key: r for r in read_all(shard)}
    assert len(records) == 4
    assert records["b.jpg"].data is None and records["b.jpg"].error.startswith("missing_file:")


# --- S3 (a real S3 server on 127.0.0.1) ---------------------------------------------------------


def test_s3_webdataset_listed_by_brace_range_glob_and_list_file_then_read(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    for i in range(3):
        fs.pipe(f"{s3_bucket}/wds/{i:05d}.tar", tar_bytes(sample_members(f"{i}0")))
    fs.pipe(f"{s3_bucket}/wds/00000_stats.json", b"{}")
    listing = f"../wds/00002.tar\ns3://{s3_bucket}/wds/00000.tar\n"
    fs.pipe(f"{s3_bucket}/lists/train.txt", listing.encode())
    options = s3_server.storage_options
    expected = [f"s3://{s3_bucket}/wds/{i:05d}.tar" for i in range(3)]

    def listed(path: str) -> list[str]:
        return uris(list_shards(f"s3://{s3_bucket}/{path}", "webdataset", options))

    assert listed("wds/{00000..00002}.tar") == expected
    assert listed("wds/*.tar") == expected
    assert listed("wds") == expected
    assert listed("lists/train.txt") == [expected[0], expected[2]]

    (record,) = read_all(Shard(expected[1], "webdataset"), storage_options=options)
    assert (record.key, record.source, record.data) == ("00001/10", expected[1], JPEG + b"10")
    assert record.metadata["txt"] == "a cat"


def test_s3_parquet_and_images(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    table = hf_image_table(4, with_id=True)
    fs.pipe(f"{s3_bucket}/pq/part-0.parquet", parquet_bytes(table, row_group_size=3))
    for name in ["x.jpg", "sub/y.png"]:
        fs.pipe(f"{s3_bucket}/img/{name}", JPEG + name.encode())
    options = s3_server.storage_options

    (shard,) = list_shards(f"s3://{s3_bucket}/pq", "parquet", options)
    records = read_all(shard, storage_options=options)
    assert [r.key for r in records] == ["id-0", "id-1", "id-2", "id-3"]
    assert records[3].data == JPEG + b"3"

    (shard,) = list_shards(f"s3://{s3_bucket}/img/", "images", options)
    assert shard.uri == f"s3://{s3_bucket}/img#00000"
    assert [(r.key, r.data) for r in read_all(shard, storage_options=options)] == [
        ("sub/y.png", JPEG + b"sub/y.png"),
        ("x.jpg", JPEG + b"x.jpg"),
    ]


def test_s3_endpoint_from_the_standard_aws_environment(s3_server, s3_bucket, monkeypatch):
    import s3fs

    s3_server.filesystem().pipe(f"{s3_bucket}/wds/00000.tar", tar_bytes(sample_members("k")))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # an option-less instance may predate the variable
    try:
        (shard,) = list_shards(f"s3://{s3_bucket}/wds", "webdataset")
        assert [r.key for r in read_all(shard)] == ["00000/k"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_missing_bucket_says_so(s3_server):
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-x/shards/\*\.tar.*bucket does not"):
        list_shards("s3://no-such-bucket-x/shards/*.tar", "webdataset", s3_server.storage_options)
    with pytest.raises(SourceError, match="bucket does not exist"):
        list_shards("s3://no-such-bucket-x/shards/00000.tar", "webdataset", s3_server.storage_options)


def closed_port_options(s3_server) -> dict:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = dict(s3_server.storage_options)
    options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{port}"}
    # Fail fast: botocore's default retries take over 10 s to give up.
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    return options


def test_s3_unreachable_endpoint_is_a_source_error_naming_the_endpoint(s3_server):
    options = closed_port_options(s3_server)
    start = time.monotonic()
    with pytest.raises(SourceError, match="cannot be listed: endpoint unreachable") as info:
        list_shards("s3://some-bucket/shards/{00000..00001}.tar", "webdataset", options)
    assert options["client_kwargs"]["endpoint_url"] in str(info.value)
    assert time.monotonic() - start < 60


def test_s3_unreachable_endpoint_while_reading_raises_shard_error(s3_server):
    options = closed_port_options(s3_server)
    with pytest.raises(ShardError, match="s3://some-bucket/00000.tar"):
        read_all(Shard("s3://some-bucket/00000.tar", "webdataset"), storage_options=options)
    with pytest.raises(ShardError):
        shard = Shard("s3://some-bucket/img#00000", "images", ("s3://some-bucket/img/a.jpg",))
        read_all(shard, storage_options=options)


def test_s3_shard_missing_at_read_time_is_a_shard_record(s3_server, s3_bucket):
    shard = Shard(f"s3://{s3_bucket}/00009.tar", "webdataset")
    (record,) = read_all(shard, storage_options=s3_server.storage_options)
    assert record.key == "00009/__shard__"
    assert record.error.startswith("shard_unreadable: FileNotFoundError")


def test_environment_is_not_modified_by_listing(shard_dir):
    before = dict(os.environ)
    list_shards(str(shard_dir), "webdataset")
    assert dict(os.environ) == before
