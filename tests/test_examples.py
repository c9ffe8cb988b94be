"""The example jobs in jobs/examples/, run as their comments say, against a real S3 server (moto on
127.0.0.1, reached through the standard AWS_ENDPOINT_URL) with the bundled model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.scenes import generate_scenes, write_scenes
from tests.pipeline_fixtures import assert_each_key_once, read_output
from tests.test_pipeline_resume import finish, start_run

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "examples"
BUCKET = "gitcap-examples"
SCENES, PER_SHARD, SEED = 64, 16, 11


@pytest.fixture(scope="module")
def examples_bucket(s3_server):
    """The examples' bucket with their input scenes; the examples' own S3 settings reach it through
    AWS_ENDPOINT_URL, as they would an S3-compatible store (local Ray workers inherit it)."""
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
    s3_server.filesystem().call_s3("create_bucket", Bucket=BUCKET)
    write_scenes(f"s3://{BUCKET}/scenes", count=SCENES, seed=SEED, shard_size=PER_SHARD)
    # Output keys of WebDataset input are SHARD/KEY: unique across shards.
    scenes = generate_scenes(SCENES, seed=SEED)
    yield {f"{i // PER_SHARD:05d}/{scene.key}": scene.caption for i, scene in enumerate(scenes)}
    if saved is None:
        del os.environ["AWS_ENDPOINT_URL"]
    else:
        os.environ["AWS_ENDPOINT_URL"] = saved


def output_of(path: str):
    return read_output(f"s3://{BUCKET}/{path}").set_index("key")


def test_caption_a_webdataset_on_s3(examples_bucket, capsys):
    assert main(["run", str(EXAMPLES / "caption-webdataset-s3.yaml"), "--num-cpus", "2", "--no-progress"]) == 0
    assert "4/4 shards committed" in capsys.readouterr().out
    frame = output_of("captions")
    assert_each_key_once(frame.reset_index(), list(examples_bucket))
    right = sum(frame.loc[key, "caption"] == caption for key, caption in examples_bucket.items())
    assert right >= 0.9 * SCENES, f"{right}/{SCENES} captions right"


def test_prompted_captioning_continues_the_prompt(examples_bucket):
    assert main(["run", str(EXAMPLES / "prompted-captioning.yaml"), "--num-cpus", "2", "--no-progress"]) == 0
    frame = output_of("prompted")
    assert len(frame) == SCENES and frame["error"].isna().all()
    # The caption column holds what follows the prompt: for two-object scenes, the true caption.
    pairs = {key: caption for key, caption in examples_bucket.items() if caption.startswith("a small ")
             and " a large " in caption}
    right = sum("a small " + frame.loc[key, "caption"] == caption for key, caption in pairs.items())
    assert pairs and right >= 0.9 * len(pairs), f"{right}/{len(pairs)}"


def test_resume_a_killed_job(examples_bucket, tmp_path):
    values = yaml.safe_load((EXAMPLES / "caption-webdataset-s3.yaml").read_text())
    values["output"]["path"] = f"s3://{BUCKET}/resumed"
    values["compute"]["shards_per_wave"] = 1
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(values))
    # Killed (SIGKILL, by itself) right after its first wave is committed.
    code, _, _ = finish(start_run(spec, failpoint="after-commit:1"))
    assert code == -9
    first = read_output(f"s3://{BUCKET}/resumed")
    assert 0 < len(first) < SCENES

    code, out, err = finish(start_run(spec))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["shards_this_run"] == 4 - len(first) // PER_SHARD  # committed shards were not redone
    assert_each_key_once(read_output(f"s3://{BUCKET}/resumed"), list(examples_bucket))


def test_a_synthetic_caption_dataset_with_five_sampled_captions(examples_bucket, s3_server):
    import tarfile

    import pyarrow.parquet as pq

    example = str(EXAMPLES / "synthetic-caption-dataset.yaml")
    assert main(["run", example, "--num-cpus", "2", "--no-progress"]) == 0
    frame = output_of("synthetic")
    assert_each_key_once(frame.reset_index(), list(examples_bucket))
    assert frame["captions"].map(len).eq(5).all() and frame["scores"].map(len).eq(5).all()
    assert all(list(s) == sorted(s, reverse=True) for s in frame["scores"])  # best first
    assert (frame["caption"] == frame["captions"].map(lambda c: c[0])).all()
    right = sum(caption in frame.loc[key, "captions"] for key, caption in examples_bucket.items())
    assert right >= 0.9 * SCENES, f"the true caption is among the 5 for {right}/{SCENES}"
    assert frame["image"].map(lambda image: image["bytes"][:3] == b"\xff\xd8\xff").all()  # the JPEG as read

    fs = s3_server.filesystem()
    root = f"{BUCKET}/synthetic/__dataset__"
    kept = pq.read_table([f"s3://{p}" for p in fs.glob(f"{root}/filtered/*.parquet")], filesystem=fs).to_pandas()
    expected = frame[frame["flags"].map(len).eq(0)]
    assert sorted(kept["key"]) == sorted(expected.index) and (kept["score"] >= -1.0).all()
    # Each sampled caption is flagged too, and the filtered view keeps only the captions that pass.
    assert frame["captions_flags"].map(len).eq(5).all()
    assert (frame["captions_flags"].map(lambda f: list(f[0])) == frame["flags"].map(list)).all()
    kept = kept.set_index("key")
    for key, row in kept.iterrows():
        passing = [c for c, f in zip(frame.loc[key, "captions"], frame.loc[key, "captions_flags"]) if not len(f)]
        assert list(row["captions"]) == passing and len(row["scores"]) == len(passing)
        assert all(len(f) == 0 for f in row["captions_flags"]) and min(row["scores"]) >= -1.0
    samples = set()
    for path in fs.glob(f"{root}/webdataset/*.tar"):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
            samples |= {name.rsplit(".", 1)[0] for name in tar.getnames()}
    assert len(samples) == SCENES
    card = fs.cat(f"{root}/README.md").decode()
    assert "num_return_sequences" in card and f"| captions in `captions` (all of the ok rows) | {5 * SCENES} |" in card

    # Sampling is seeded per key: the same job into another folder samples the same captions.
    again = ["--set", f"output.path=s3://{BUCKET}/synthetic-again"]
    assert main(["run", example, "--num-cpus", "2", "--no-progress", *again]) == 0
    repeat = output_of("synthetic-again")
    assert (repeat.loc[frame.index, "captions"].map(list) == frame["captions"].map(list)).all()
