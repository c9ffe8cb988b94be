"""Synthetic caption datasets: quality flags on every row, the filtered view and the WebDataset
tars derived exactly once from the committed files, the dataset card, and every reader of the
output seeing each row once. End-to-end runs use a real 2-CPU Ray, locally and on S3."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import run_caption_job
from pipeline.job import CaptionJob, FilterConfig, JobConfigError, QualityConfig
from pipeline.progress import JobProgress
from pipeline.quality import FLAG_CODES, caption_flags, caption_words, has_repeated_ngram
from pipeline.sink import ParquetSink, file_summary, output_table
from pipeline.storage import Folder
from pipeline.views import (
    CARD_FILE, FILTERED, RECORDS, WEBDATASET, SampleNames, filtered_view, finish_dataset, publish_views,
    write_webdataset_tar,
)
from tests.pipeline_fixtures import (  # noqa: F401  (fixtures)
    assert_each_key_once,
    job,
    ray_local,
    read_output,
    scene_jpeg,
    scene_shard,
    tar_bytes,
    tiny_model,
)

# --- the flag rules ---------------------------------------------------------------------------


def test_words_are_runs_of_letters_and_digits_and_punctuation_is_not_one():
    assert caption_words("A dog's 2 balls , on grass .") == ["a", "dog's", "2", "balls", "on", "grass"]
    assert caption_words(" . , ") == []


@pytest.mark.parametrize("caption, looped", [
    ("a dog a dog", True),
    ("on the left on the left of a tree", True),
    ("very very very big", True),
    ("The cat, the cat", True),
    ("a man on a horse on a beach", False),  # words repeat with others between: ordinary English
    ("a very very big dog", False),  # twice in a row is emphasis, three times is a loop
    ("a man in a red shirt and a man in a blue shirt", False),
])
def test_repeated_ngram_means_a_decoder_loop(caption, looped):
    assert has_repeated_ngram(caption_words(caption)) is looped


@pytest.mark.parametrize("caption, score, flags", [
    ("a red circle above a square", -0.5, []),
    ("", -3.0, ["empty", "low_score"]),
    ("a circle", -0.5, ["too_short"]),
    ("one two three four five six seven", -0.5, ["too_long"]),
    ("a dog a dog", -1.5, ["repeated_ngram", "low_score"]),
])
def test_caption_flags(caption, score, flags):
    rules = QualityConfig(min_words=3, max_words=6, min_score=-1.0)
    assert caption_flags(caption_words(caption), score, rules) == flags


def test_no_low_score_flag_without_min_score():
    assert caption_flags(["a", "b", "c"], -50.0, QualityConfig()) == []


def test_output_rows_get_words_and_flags_and_error_rows_get_nulls():
    rows = pa.table({
        "shard": ["s"] * 3, "seq": [0, 1, 2], "key": ["a", "b", "c"], "source": ["s"] * 3, "width": [4] * 3,
        "height": [3] * 3, "error": [None, "truncated: cut", None], "meta": [pickle.dumps({"flags": "x"})] * 3,
        "image": pa.array([None] * 3, pa.binary()), "caption": ["a dog a dog", None, "a cat"],
        "score": pa.array([-1.0, None, -0.2], pa.float32()),
    })
    table = output_table(rows, "m", multi=False, include_image=False, quality=QualityConfig(min_words=3))
    assert table.column_names[7:11] == ["model", "words", "flags", "source_flags"]  # metadata never shadows ours
    assert table["words"].to_pylist() == [4, None, 2]
    assert table["flags"].to_pylist() == [["repeated_ngram"], None, ["too_short"]]


def test_each_of_several_captions_is_flagged_and_the_view_keeps_the_ones_that_pass():
    rows = pa.table({
        "shard": ["s"] * 3, "seq": [0, 1, 2], "key": ["a", "b", "c"], "source": ["s"] * 3, "width": [4] * 3,
        "height": [3] * 3, "error": [None, "truncated: cut", None], "meta": [pickle.dumps({})] * 3,
        "image": pa.array([None] * 3, pa.binary()), "caption": ["a red cat", None, "a dog a dog"],
        "score": pa.array([-0.1, None, -0.3], pa.float32()),
        "captions": [["a red cat", "cat", "a big red cat"], None, ["a dog a dog", "a brown dog"]],
        "scores": pa.array([[-0.1, -0.2, -0.5], None, [-0.3, -0.4]], pa.list_(pa.float32())),
    })
    table = output_table(rows, "m", multi=True, include_image=False, quality=QualityConfig(min_words=2))
    assert table["captions_flags"].to_pylist() == [[[], ["too_short"], []], None, [["repeated_ngram"], []]]
    view = filtered_view(table, FilterConfig(drop_flags=["too_short", "repeated_ngram"]))
    assert view["key"].to_pylist() == ["a"]  # the row goes with its best caption
    assert view["captions"].to_pylist() == [["a red cat", "a big red cat"]]
    assert view["scores"].to_pylist()[0] == pytest.approx([-0.1, -0.5])
    assert view["captions_flags"].to_pylist() == [[[], []]]


# --- views kept in step with the data files --------------------------------------------------


def publish_data_file(folder: Folder, job: CaptionJob, name: str) -> None:
    """Commit a data file of two rows as a run does: the file, its manifest, then its views."""
    rows = pa.table({
        "shard": [name] * 2, "seq": [0, 1], "key": [f"{name}/0", f"{name}/1"], "source": [name] * 2,
        "width": [4] * 2, "height": [3] * 2, "error": [None, None], "meta": [pickle.dumps({})] * 2,
        "image": pa.array([None] * 2, pa.binary()), "caption": ["a red cat", "a blue dog"],
        "score": pa.array([-0.1, -0.2], pa.float32()),
    })
    table = output_table(rows, "m", multi=False, include_image=False)
    info = {**file_summary(table, [name]), "run": "r1", "committed_at": time.time()}
    size = ParquetSink(folder).write(name, table, info)
    JobProgress(folder).write_commit(name, {**info, "size": size})
    publish_views(folder, job.output, name, table, {**info, "size": size})


def test_views_of_a_file_committed_while_a_run_finishes_survive(tmp_path):
    folder, job = Folder(str(tmp_path)), CaptionJob.from_dict(spec(path=str(tmp_path), filter={}))
    publish_data_file(folder, job, "part-a.parquet")
    manifests = JobProgress(folder).reconcile(repair=False)  # what the finishing run knows
    publish_data_file(folder, job, "part-b.parquet")  # committed since, by a run that started meanwhile

    finish_dataset(folder, job, manifests, complete=False)
    assert (tmp_path / FILTERED / "part-b.parquet").exists() and (tmp_path / RECORDS / "part-b.json").exists()
    assert pq.read_table(tmp_path / FILTERED).num_rows == pq.read_table(tmp_path).num_rows == 4


def test_a_view_whose_file_is_gone_is_built_again(tmp_path):
    folder, job = Folder(str(tmp_path)), CaptionJob.from_dict(spec(path=str(tmp_path), filter={}))
    publish_data_file(folder, job, "part-a.parquet")
    (tmp_path / FILTERED / "part-a.parquet").unlink()  # its record stays

    finish_dataset(folder, job, JobProgress(folder).reconcile(repair=False), complete=False)
    assert pq.read_table(tmp_path / FILTERED / "part-a.parquet").num_rows == 2


# --- the spec ---------------------------------------------------------------------------------


def spec(**output) -> dict:
    return {"input": {"path": "in"}, "output": {"path": "out", **output}}


@pytest.mark.parametrize("output, field", [
    ({"filter": {"drop_flags": ["blurry"]}}, "output.filter.drop_flags"),
    ({"filter": {"min_score": -1}}, "output.filter.min_score"),
    ({"filter": "yes"}, "output.filter"),
    ({"quality": {"min_words": 0}}, "output.quality.min_words"),
    ({"quality": {"min_words": 5, "max_words": 4}}, "output.quality.max_words"),
    ({"quality": {"min_score": "low"}}, "output.quality.min_score"),
    ({"webdataset": True}, "output.webdataset"),  # the tars need the image bytes in the output
])
def test_bad_dataset_settings_name_the_field(output, field):
    with pytest.raises(JobConfigError) as caught:
        CaptionJob.from_dict(spec(**output))
    assert caught.value.field == field


def test_an_empty_filter_drops_every_flag_and_none_means_no_view():
    assert CaptionJob.from_dict(spec(filter={})).output.filter.drop_flags == [
        "empty", "too_short", "too_long", "repeated_ngram", "low_score"]
    assert CaptionJob.from_dict(spec(filter=None)).output.filter is None


def test_views_may_change_between_runs_but_flag_thresholds_may_not():
    base = CaptionJob.from_dict(spec()).fingerprint()
    views = CaptionJob.from_dict(spec(include_image=True, webdataset=True, filter={"drop_flags": ["empty"]}))
    assert views.fingerprint() == CaptionJob.from_dict(spec(include_image=True)).fingerprint()
    assert CaptionJob.from_dict(spec(quality={"max_words": 12})).fingerprint() != base


# --- end to end -------------------------------------------------------------------------------


def read_view(folder) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive").to_pandas()


def read_tars(tars: list[bytes]) -> dict[str, dict[str, bytes]]:
    """{sample name: {extension: bytes}}, as a WebDataset loader groups tar members."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                key, ext = base.split(".", 1)
                name = f"{folder}/{key}" if folder else key
                assert ext not in samples[name], f"{member.name} twice"
                samples[name][ext] = tar.extractfile(member).read()
    return dict(samples)


def test_tar_sample_names_are_unique_safe_and_end_before_the_first_dot():
    names = SampleNames()
    given = [names.of(key) for key in ["a.b.jpg", "a_b_jpg", "p/1", "p/1", "", "../../etc/x.y", "/abs//k", "p/1"]]
    assert given == ["a_b_jpg", "a_b_jpg_2", "p/1", "p/1_2", "_", "etc/x_y", "abs/k", "p/1_3"]
    image = scene_jpeg(0)
    table = pa.table({"key": ["a.b.jpg", "a_b.jpg", "x"], "caption": ["one", "two", "three"],
                      "error": pa.array([None, None, None], pa.string()),
                      "image": [{"bytes": image, "path": k} for k in ("a.b.jpg", "a_b.jpg", "x")]})
    buffer = io.BytesIO()
    write_webdataset_tar(table, buffer, mtime=0)
    samples = read_tars([buffer.getvalue()])  # refuses a member name twice, as WebDataset does
    assert {name: json.loads(s["json"])["key"] for name, s in samples.items()} == {
        "a_b_jpg": "a.b.jpg", "a_b_jpg_2": "a_b.jpg", "x": "x"}


def local_tars(out) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / WEBDATASET).glob("*.tar"))]


def expected_view(frame: pd.DataFrame, drop: set[str]) -> set[str]:
    return {k for k, e, f in zip(frame["key"], frame["error"], frame["flags"]) if pd.isna(e) and not drop & set(f)}


def view_files(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "__dataset__").rglob("*") if p.is_file()}


@pytest.mark.usefixtures("ray_local")
def test_dataset_outputs_each_row_once_for_every_reader(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(2):
        (folder / f"{n:05d}.tar").write_bytes(scene_shard(n * 5, 5))
    broken = [("ok.jpg", scene_jpeg(20)), ("ok.txt", b"scene 20"), ("ok.json", b'{"index": 20}'),
              ("cut.jpg", scene_jpeg(21)[:150]), ("cut.txt", b"scene 21"), ("cut.json", b'{"index": 21}')]
    (folder / "00002.tar").write_bytes(tar_bytes(broken))  # the same metadata as the others: one schema
    out = tmp_path / "out"
    drop = {"too_short", "repeated_ngram"}
    values = dict(output={"include_image": True, "webdataset": True, "quality": {"min_words": 4, "max_words": 8},
                          "filter": {"drop_flags": sorted(drop)}},
                  generation={"max_new_tokens": 10})
    summary = run_caption_job(job(str(folder), str(out), tiny_model, **values))
    assert (summary.images_ok, summary.images_failed, summary.exit_code) == (11, 1, 0)

    frame = read_output(str(out))
    ok = frame[frame["error"].isna()]
    assert frame.loc[frame["error"].notna(), "flags"].isna().all()
    assert list(ok["words"]) == [len(caption_words(c)) for c in ok["caption"]]
    kept = expected_view(frame, drop)
    assert 0 < len(kept) < len(ok), "the tiny model's captions should be a mix of flagged and not"

    view = read_view(out / FILTERED)
    assert_each_key_once(view, kept)
    assert len(list((out / FILTERED).iterdir())) == 3  # one per data file

    samples = read_tars(local_tars(out))
    assert set(samples) == set(ok["key"])  # the error row is not there (these keys have no dots)
    for key, caption, index in zip(ok["key"], ok["caption"], ok["txt"]):
        sample = samples[key]
        assert sample["txt"].decode() == caption and sorted(sample) == ["jpg", "json", "txt"]
        assert sample["jpg"] == scene_jpeg(int(index.split()[-1]))
        described = json.loads(sample["json"])
        assert described["key"] == key and described["flags"] == list(ok.set_index("key").loc[key, "flags"])

    card = (out / CARD_FILE).read_text()
    flagged = sum(1 for f in ok["flags"] if len(f))
    for line in ["| ok | 11 |", "| failed | 1 |", f"| flagged (ok rows with any flag) | {flagged} |",
                 f"| kept by the filter (filtered/) | {len(kept)} |", "## Score distribution", "truncated 1"]:
        assert line in card, line
    assert ok["caption"].iloc[0] in card

    total, keys = len(frame), set(frame["key"])
    assert len(pd.read_parquet(out)) == total and set(pd.read_parquet(out)["key"]) == keys
    assert pq.read_table(out).num_rows == total
    duckdb = pytest.importorskip("duckdb")
    counted = duckdb.sql(f"select count(*), count(distinct key) from read_parquet('{out}/*.parquet')").fetchall()
    assert counted == [(total, total)]
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf")
    for loaded in (datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=cache),
                   datasets.load_dataset(str(out), split="train", cache_dir=cache),
                   datasets.load_dataset(str(out / "__dataset__"), split="train", cache_dir=cache)):
        assert sorted(loaded["key"]) == sorted(keys)
    filtered = datasets.load_dataset(str(out / "__dataset__"), "filtered", split="train", cache_dir=cache)
    assert sorted(filtered["key"]) == sorted(kept)

    # A rerun of the finished job touches nothing, views and card included.
    before = view_files(out)
    again = run_caption_job(job(str(folder), str(out), tiny_model, **values))
    assert again.images_this_run == 0 and view_files(out) == before

    # A crash between a commit and its views: the next run rebuilds them, once.
    tar = sorted((out / WEBDATASET).glob("*.tar"))[0]
    tar.unlink()
    (out / RECORDS / tar.name.replace(".tar", ".json")).unlink()
    run_caption_job(job(str(folder), str(out), tiny_model, **values))
    assert read_tars(local_tars(out)) == samples
    assert_each_key_once(read_view(out / FILTERED), kept)

    # The views are not part of the job's fingerprint: another filter, no tars, and no captioning.
    values["output"].update(filter={"drop_flags": []}, webdataset=False)
    other = run_caption_job(job(str(folder), str(out), tiny_model, **values))
    assert other.images_this_run == 0
    assert_each_key_once(read_view(out / FILTERED), set(ok["key"]))
    assert not list((out / WEBDATASET).glob("*.tar"))
    assert "| kept by the filter (filtered/) | 11 |" in (out / CARD_FILE).read_text()


@pytest.mark.usefixtures("ray_local")
def test_retry_failed_rebuilds_the_views_of_the_file_it_replaces(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [(f"{i:03d}.jpg", scene_jpeg(i)) for i in range(3)]
    (folder / "s.tar").write_bytes(tar_bytes(good + [("003.jpg", scene_jpeg(3)[:200])]))
    dataset_job = job(str(folder), str(tmp_path / "out"), tiny_model,
                output={"include_image": True, "webdataset": True, "filter": {"drop_flags": []}})
    run_caption_job(dataset_job)
    assert "s/003" not in set(read_view(tmp_path / "out" / FILTERED)["key"])

    (folder / "s.tar").write_bytes(tar_bytes(good + [("003.jpg", scene_jpeg(3))]))
    run_caption_job(dataset_job, retry_failed=True)
    assert_each_key_once(read_view(tmp_path / "out" / FILTERED), [f"s/{i:03d}" for i in range(4)])
    samples = read_tars(local_tars(tmp_path / "out"))
    assert set(samples) == {f"s/{i:03d}" for i in range(4)} and samples["s/003"]["jpg"] == scene_jpeg(3)
    assert "| failed | 0 |" in (tmp_path / "out" / CARD_FILE).read_text()


@pytest.mark.usefixtures("ray_local")
def test_dataset_outputs_on_s3(tiny_model, s3_server, s3_bucket):
    options = s3_server.storage_options
    fs = s3_server.filesystem()
    for n in range(2):
        fs.pipe(f"{s3_bucket}/in/{n:05d}.tar", scene_shard(n * 3, 3))
    out = f"s3://{s3_bucket}/out"
    summary = run_caption_job(job(f"s3://{s3_bucket}/in", out, tiny_model,
                                  input={"storage_options": options},
                                  output={"storage_options": options, "include_image": True, "webdataset": True,
                                          "filter": {}}))
    assert summary.images_ok == 6

    frame = read_output(out, options)
    fs.invalidate_cache()
    parts = fs.glob(f"{s3_bucket}/out/{FILTERED}/*.parquet")
    filtered = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in parts])
    assert_each_key_once(filtered.to_pandas(), expected_view(frame, set(FLAG_CODES)))
    tars = [fs.cat_file(f) for f in sorted(fs.glob(f"{s3_bucket}/out/{WEBDATASET}/*.tar"))]
    assert len(tars) == 2 and set(read_tars(tars)) == set(frame["key"])
    assert "| ok | 6 |" in fs.cat_file(f"{s3_bucket}/out/{CARD_FILE}").decode()
    assert len(pd.read_parquet(out, storage_options=options)) == 6
    assert pq.read_table(f"{s3_bucket}/out", filesystem=fs).num_rows == 6


def test_a_score_that_is_not_a_number_lands_in_the_lowest_bin_of_the_card():
    from pipeline.card import SCORE_FLOOR, _score_bin

    assert _score_bin(float("-inf")) == _score_bin(float("nan")) == SCORE_FLOOR
    assert _score_bin(-0.7) == -1.0
