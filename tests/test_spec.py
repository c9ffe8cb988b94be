"""Job specs: YAML with defaults, typed `--set` overrides, and preflight checks that fail before any
model loads with one message naming the field and the cause."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from jobs.spec import apply_override, load_spec, preflight, spec_from_dict
from pipeline import JobConfigError, JobMismatchError
from pipeline.job import CaptionJob
from pipeline.progress import JobProgress
from pipeline.storage import Folder
from tests.pipeline_fixtures import tiny_model, write_scene_shards  # noqa: F401  (fixtures)


def write_spec(tmp_path, values) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
    return str(path)


def minimal(tmp_path, model="m") -> dict:
    return {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "model": {"path": model}}


def error_of(call, *args, **kwargs) -> JobConfigError:
    with pytest.raises(JobConfigError) as info:
        call(*args, **kwargs)
    return info.value


# --- loading and overrides --------------------------------------------------------------------


def test_minimal_spec_gets_the_documented_defaults(tmp_path):
    job = load_spec(write_spec(tmp_path, "input: {path: shards/}\noutput: {path: out/}\n"))
    assert (job.input.format, job.model.path) == ("webdataset", None)
    g, c = job.generation, job.compute
    assert (g.max_new_tokens, g.num_beams, g.do_sample, g.num_return_sequences, g.prompt) == (20, 1, False, 1, None)
    assert (c.batch_size, c.workers, c.gpus_per_worker) == (None, None, None)  # auto: pipeline.cluster
    with pytest.raises(ValueError, match="resolve compute first"):
        c.images_per_batch  # noqa: B018  (the device decides it)


def test_batch_size_defaults_to_the_workers_device_unless_set(tmp_path):
    gpu = load_spec(write_spec(tmp_path, minimal(tmp_path)), ["compute.gpus_per_worker=1"]).compute
    assert (gpu.batch_size, gpu.images_per_batch) == (None, 256)
    cpu = load_spec(write_spec(tmp_path, minimal(tmp_path)), ["compute.gpus_per_worker=0"]).compute
    assert cpu.images_per_batch == 32
    chosen = load_spec(write_spec(tmp_path, minimal(tmp_path)), ["compute.gpus_per_worker=1", "compute.batch_size=64"])
    assert chosen.compute.images_per_batch == 64


def test_overrides_are_yaml_typed(tmp_path):
    job = load_spec(write_spec(tmp_path, minimal(tmp_path)), [
        "generation.num_beams=3", "generation.num_return_sequences=2", "generation.prompt=what is it",
        "compute.gpus_per_worker=0.5", "input.storage_options={anon: true}",
    ])
    assert (job.generation.num_beams, job.generation.num_return_sequences) == (3, 2)
    assert job.generation.prompt == "what is it"
    assert job.compute.gpus_per_worker == 0.5 and job.input.storage_options == {"anon": True}
    assert load_spec(write_spec(tmp_path, {**minimal(tmp_path), "generation": {"prompt": "x"}}),
                     ["generation.prompt=null"]).generation.prompt is None


def test_override_creates_missing_sections(tmp_path):
    values = {"input": {"path": "a"}}
    apply_override(values, "output.path=s3://bucket/out")
    assert spec_from_dict(values).output.path == "s3://bucket/out"


@pytest.mark.parametrize(
    ("override", "field"),
    [("generation.num_beams=three", "generation.num_beams"), ("compute.batch_size=0", "compute.batch_size"),
     ("generation.beams=3", "generation.beams"), ("nonsense", "nonsense"), ("input.path.x=1", "input.path"),
     ("generation.do_sample=maybe", "generation.do_sample")],
)
def test_bad_overrides_name_the_field(tmp_path, override, field):
    err = error_of(load_spec, write_spec(tmp_path, minimal(tmp_path)), [override])
    assert err.field == field and str(err).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("text", "field"),
    [("input: {path: a}\noutput: {path: b}\nmodle: {path: c}\n", "modle"),
     ("input: {path: a}\n", "output"),
     ("input: {path: a, format: tar}\noutput: {path: b}\n", "input.format"),
     ("input: {path: a}\noutput: {path: b}\ncompute: {workers: two}\n", "compute.workers"),
     ("- a list\n", "job"),
     ("input: {path: [unclosed\n", "job")],
)
def test_invalid_specs_name_the_field(tmp_path, text, field):
    assert error_of(load_spec, write_spec(tmp_path, text)).field == field


def test_missing_spec_file_is_a_clear_error(tmp_path):
    err = error_of(load_spec, str(tmp_path / "nope.yaml"))
    assert "cannot read the job spec" in str(err)


# --- preflight --------------------------------------------------------------------------------


def test_preflight_passes_a_runnable_job_and_counts_its_shards(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=2, per_shard=2)
    report = preflight(CaptionJob.from_dict(minimal(tmp_path, tiny_model)))
    assert (report.shards, report.model_path) == (2, tiny_model)
    assert not list((tmp_path / "out").rglob("*preflight*"))  # the write probe was deleted


def test_preflight_names_a_missing_input(tmp_path, tiny_model):
    err = error_of(preflight, CaptionJob.from_dict(minimal(tmp_path, tiny_model)))
    assert err.field == "input.path" and "does not exist" in str(err)


def test_preflight_names_an_unreadable_output(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    (tmp_path / "file").write_text("not a folder")
    spec = {**minimal(tmp_path, tiny_model), "output": {"path": str(tmp_path / "file" / "out")}}
    err = error_of(preflight, CaptionJob.from_dict(spec))
    assert err.field == "output.path" and "cannot write" in str(err)


def test_preflight_names_a_model_path_without_a_checkpoint(tmp_path):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    (tmp_path / "empty").mkdir()
    err = error_of(preflight, CaptionJob.from_dict(minimal(tmp_path, str(tmp_path / "empty"))))
    assert err.field == "model.path" and "config.json" in str(err)


def test_preflight_refuses_more_new_tokens_than_the_model_has_positions(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    positions = json.loads((Path(tiny_model) / "config.json").read_text())["max_position_embeddings"]
    spec = minimal(tmp_path, tiny_model)
    err = error_of(preflight, CaptionJob.from_dict({**spec, "generation": {"max_new_tokens": positions + 1}}))
    assert err.field == "generation.max_new_tokens" and f"it has {positions} text positions" in str(err)
    preflight(CaptionJob.from_dict({**spec, "generation": {"max_new_tokens": positions}}))


def test_preflight_counts_the_prompts_tokens_against_the_models_text_positions(tmp_path, tiny_model):
    from gitmodel import GitProcessor

    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    positions = json.loads((Path(tiny_model) / "config.json").read_text())["max_position_embeddings"]
    prompt = "a question of many words that the tiny model reads"
    length = GitProcessor.from_pretrained(tiny_model).prompt_inputs(prompt, 1)[0].shape[1]  # [CLS] + prompt
    spec = minimal(tmp_path, tiny_model)

    def job(**generation) -> CaptionJob:
        return CaptionJob.from_dict({**spec, "generation": {"prompt": prompt, **generation}})

    most = positions - length + 1
    preflight(job(max_new_tokens=most))
    err = error_of(preflight, job(max_new_tokens=most + 1))
    assert err.field == "generation.max_new_tokens"
    assert f"{length} tokens with [CLS]: it has {positions} text positions, so at most {most} new tokens" in str(err)
    err = error_of(preflight, job(prompt=" ".join(["word"] * positions), max_new_tokens=1))
    assert err.field == "generation.prompt" and f"more than the {positions} text positions" in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "config.json holds a list, not a GIT config object"), ("{nope", "config.json is not valid JSON"),
     ('{"vision_config": [1]}', "config.json is not a GIT config: ")],
)
def test_preflight_names_a_config_json_that_is_not_a_git_config(tmp_path, tiny_model, text, message):
    import shutil

    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text(text)
    err = error_of(preflight, CaptionJob.from_dict(minimal(tmp_path, str(model))))
    assert err.field == "model.path" and message in str(err)


def test_preflight_refuses_generation_defaults_gitmodel_does_not_implement(tmp_path, tiny_model):
    import shutil

    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    defaults = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**defaults, "bad_words_ids": [[7]]}))
    err = error_of(preflight, CaptionJob.from_dict(minimal(tmp_path, str(model))))
    assert err.field == "model.path" and "bad_words_ids=[[7]]" in str(err)


def test_preflight_finds_the_parquet_image_column_as_the_reader_does(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.scenes import write_scenes

    write_scenes(str(tmp_path / "in"), count=2, seed=0, format="parquet")
    spec = {**minimal(tmp_path, tiny_model), "input": {"path": str(tmp_path / "in"), "format": "parquet"}}
    preflight(CaptionJob.from_dict(spec))  # found by its type
    preflight(CaptionJob.from_dict({**spec, "input": {**spec["input"], "image_column": "image"}}))
    err = error_of(preflight, CaptionJob.from_dict({**spec, "input": {**spec["input"], "image_column": "imgae"}}))
    assert err.field == "input.image_column" and "00000.parquet has no column 'imgae' (columns: " in str(err)

    pq.write_table(pa.table({"url": ["http://x/1.jpg"]}), tmp_path / "in" / "00000.parquet")
    err = error_of(preflight, CaptionJob.from_dict(spec))
    assert err.field == "input.image_column" and "has no image column" in str(err)


def test_preflight_names_unreachable_storage(tmp_path, tiny_model):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    spec = {**minimal(tmp_path, tiny_model), "input": {"path": "s3://bucket/in", "storage_options": options}}
    err = error_of(preflight, CaptionJob.from_dict(spec))
    assert err.field == "input.path" and "s3://bucket/in" in str(err) and "endpoint unreachable" in str(err)
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    unwritable = {**minimal(tmp_path, tiny_model), "output": {"path": "s3://bucket/out", "storage_options": options}}
    err = error_of(preflight, CaptionJob.from_dict(unwritable))
    assert err.field == "output.path" and "endpoint unreachable: check client_kwargs.endpoint_url" in str(err)


def test_preflight_reads_s3_and_writes_to_s3(tmp_path, tiny_model, s3_server, s3_bucket):
    from pipeline.scenes import write_scenes

    options = s3_server.storage_options
    write_scenes(f"s3://{s3_bucket}/in", count=3, seed=0, shard_size=2, storage_options=options)
    spec = {"input": {"path": f"s3://{s3_bucket}/in", "storage_options": options}, "model": {"path": tiny_model},
            "output": {"path": f"s3://{s3_bucket}/out", "storage_options": options}}
    assert preflight(CaptionJob.from_dict(spec)).shards == 2
    missing = {**spec, "output": {"path": "s3://no-such-bucket-here/out", "storage_options": options}}
    err = error_of(preflight, CaptionJob.from_dict(missing))
    assert err.field == "output.path" and "does not exist" in str(err) and "no-such-bucket-here" in str(err)
    missing_input = {**spec, "input": {"path": "s3://no-such-bucket-here/in", "storage_options": options}}
    err = error_of(preflight, CaptionJob.from_dict(missing_input))
    assert err.field == "input.path" and "bucket does not exist" in str(err)


def test_preflight_without_credentials_says_so(tmp_path, tiny_model, s3_server, s3_bucket, monkeypatch):
    options = {"client_kwargs": s3_server.storage_options["client_kwargs"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    spec = {**minimal(tmp_path, tiny_model), "input": {"path": f"s3://{s3_bucket}/in", "storage_options": options}}
    err = error_of(preflight, CaptionJob.from_dict(spec))
    assert err.field == "input.path" and "no credentials found" in str(err)


@pytest.mark.parametrize(
    ("code", "cause"),
    [("InvalidAccessKeyId", "credentials rejected"), ("AccessDenied", "permission denied"),
     ("NoSuchBucket", "does not exist"), ("SlowDown", "")],  # no advice for what it does not know
)
def test_storage_errors_are_explained_by_their_cause(code, cause):
    from botocore.exceptions import ClientError

    from pipeline.storage import storage_error_cause

    boto = ClientError({"Error": {"Code": code, "Message": "the server's words"}}, "PutObject")
    wrapped = OSError(5, "the server's words")  # as s3fs re-raises it
    wrapped.__cause__ = boto
    for err in (boto, wrapped):
        text = storage_error_cause(err)
        assert "the server's words" in text
        assert text.startswith(cause) if cause else text == f"{type(err).__name__}: {err}"


def test_preflight_refuses_other_settings_over_committed_output(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    job = CaptionJob.from_dict(minimal(tmp_path, tiny_model))
    progress = JobProgress(Folder(job.output.path))
    progress.start(job, lambda: [], "m")
    (tmp_path / "out" / "part-x.parquet").write_bytes(b"committed data")  # stands for a data file
    changed = CaptionJob.from_dict({**minimal(tmp_path, tiny_model), "generation": {"max_new_tokens": 5}})
    with pytest.raises(JobMismatchError, match=r"generation\.max_new_tokens: 20 -> 5"):
        preflight(changed)
    preflight(job)  # the same settings resume
