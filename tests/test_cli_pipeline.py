"""`gitcap run`, `gitcap status` and `gitcap demo` as a user types them: exit statuses, summaries,
refusals before any cluster starts, and the demo's side-by-side captions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from tests.pipeline_fixtures import tiny_model, write_scene_shards  # noqa: F401  (fixtures)


def spec(tmp_path, model, **extra) -> str:
    values = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
              "model": {"path": model}, "compute": {"batch_size": 4}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_run_status_rerun_and_refusal(tmp_path, tiny_model, capsys):
    write_scene_shards(tmp_path / "in", shards=2, per_shard=3)
    (tmp_path / "in" / "00002.tar").write_bytes(b"not a tar" * 100)
    job = spec(tmp_path, tiny_model)

    assert main(["run", job, "--num-cpus", "2", "--no-progress"]) == 3  # a source failed
    printed = capsys.readouterr().out
    assert "3/3 shards committed (3 this run)" in printed
    assert "images: 6 ok, 0 failed" in printed
    assert "failed source: " in printed and "00002.tar: shard_unreadable" in printed
    assert "exit status 3: some sources failed" in printed

    assert main(["status", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "3/3 done" in printed and "6 ok, 0 failed" in printed and "last run" in printed
    assert main(["status", job, "--json"]) == 0  # the spec names the output
    status = json.loads(capsys.readouterr().out)
    assert (status["shards_done"], status["images_ok"], status["complete"]) == (3, 6, True)

    assert main(["run", job, "--set", "generation.num_beams=2"]) == 2  # refused before Ray starts
    assert "generation.num_beams: 1 -> 2" in capsys.readouterr().err

    assert main(["run", job, "--num-cpus", "2", "--no-progress", "--json"]) == 3
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards_this_run"], summary["images_this_run"], summary["shards_done"]) == (0, 0, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--set", "compute.batch_size=zero"], "compute.batch_size: expected an integer"),
     (["--set", "input.path=/no/such/shards"], "input.path: /no/such/shards"),
     (["--set", "model.path=/no/such/model"], "model.path: /no/such/model")],
)
def test_invalid_specs_exit_2_naming_the_field(tmp_path, tiny_model, capsys, args, message):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    assert main(["run", spec(tmp_path, tiny_model), *args]) == 2
    assert message in capsys.readouterr().err


def test_status_of_a_folder_without_a_job(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 1
    assert "no gitcap job here" in capsys.readouterr().err


def test_demo_shows_captions_beside_the_truth(tmp_path, tiny_model, capsys):
    assert main(["demo", "--count", "12", "--out", str(tmp_path / "demo"), "--model", tiny_model,
                 "--batch-size", "4", "--num-cpus", "2"]) == 0
    printed = capsys.readouterr().out
    assert "captioning 12 synthetic scenes" in printed
    assert "truth" in printed.splitlines()[1] and "exact match: " in printed and "/12 = " in printed
    assert len([line for line in printed.splitlines() if re.match(r"\d{5}/\d{9} ", line)]) == 8


def test_a_model_that_cannot_load_fails_the_run_in_one_line(tmp_path, tiny_model, capsys):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # passes preflight, fails in the actor
    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)

    assert main(["run", spec(tmp_path, str(broken)), "--num-cpus", "2", "--no-progress"]) == 1
    assert "gitcap run: failed: gitmodel.checkpoint.CheckpointError: " in capsys.readouterr().err
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "failed: gitmodel.checkpoint.CheckpointError" in capsys.readouterr().out


def test_a_model_that_fails_on_every_image_stops_the_run_instead_of_writing_error_rows(tmp_path, tiny_model, capsys):
    import shutil

    # A tokenizer from another checkpoint: the prompt's last word has an id beyond the model's
    # vocabulary, which preflight does not check, so every image fails in the model.
    mismatched = tmp_path / "mismatched-model"
    shutil.copytree(tiny_model, mismatched)
    (mismatched / "tokenizer.json").unlink()
    with open(mismatched / "vocab.txt", "a", encoding="utf-8") as vocab:
        vocab.write("zebra\n")
    write_scene_shards(tmp_path / "in", shards=2, per_shard=3)
    generation = {"prompt": "what is the zebra"}
    assert main(["run", spec(tmp_path, str(mismatched), generation=generation), "--num-cpus", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "gitcap run: failed: " in err and "CaptioningError: the model failed on each of the" in err
    assert "index out of range" in err
    assert not list((tmp_path / "out").glob("*.parquet")), "no error rows were committed"


def test_a_prompt_too_long_for_the_model_is_refused_before_ray_starts(tmp_path, tiny_model, capsys):
    positions = json.loads((Path(tiny_model) / "config.json").read_text())["max_position_embeddings"]
    write_scene_shards(tmp_path / "in", shards=1, per_shard=1)
    generation = {"prompt": "a question of many words that the tiny model reads", "max_new_tokens": positions - 2}
    assert main(["run", spec(tmp_path, tiny_model, generation=generation)]) == 2
    assert "generation.max_new_tokens: " in capsys.readouterr().err


def test_demo_with_the_bundled_model_or_a_clear_message(tmp_path, capsys):
    from pipeline.captioner import resolve_model

    try:
        resolve_model(None)
    except FileNotFoundError:
        assert main(["demo", "--count", "4", "--out", str(tmp_path / "demo")]) == 2
        assert "no bundled model yet" in capsys.readouterr().err
        return
    assert main(["demo", "--count", "16", "--out", str(tmp_path / "demo"), "--num-cpus", "2"]) == 0
    assert "exact match: " in capsys.readouterr().out


def test_a_smaller_demo_after_a_larger_one_captions_only_its_own_scenes(tmp_path):
    import tarfile

    from jobs.demo import demo_job

    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "notes.txt").write_text("the user's own file")
    demo_job(str(tmp_path), 64, None, 4, 1)  # 8 shards of 8
    job = demo_job(str(tmp_path), 4, None, 4, 1)  # 4 shards of 1
    images = 0
    for shard in Path(job.input.path).glob("*.tar"):
        with tarfile.open(shard) as tar:
            images += sum(name.endswith(".jpg") for name in tar.getnames())
    assert images == 4
    assert (tmp_path / "scenes" / "notes.txt").exists()  # only what the demo wrote goes


def test_a_dashboard_url_in_RAY_ADDRESS_leaves_demo_and_run_on_a_private_ray(tmp_path, tiny_model, capsys, monkeypatch):
    # What the README has users export for `gitcap submit`, `logs` and `stop`.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert main(["demo", "--count", "4", "--out", str(tmp_path / "demo"), "--model", tiny_model,
                 "--batch-size", "4", "--num-cpus", "2"]) == 0
    assert "/4 = " in capsys.readouterr().out

    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)
    assert main(["run", spec(tmp_path, tiny_model), "--num-cpus", "2", "--no-progress"]) == 0
    assert "$RAY_ADDRESS (http://127.0.0.1:9) is a dashboard, for `gitcap submit`: running on a local Ray" \
        in capsys.readouterr().err

    # Named on the command line, a dashboard is a mistake about what `run` joins.
    assert main(["run", spec(tmp_path, tiny_model), "--address", "http://127.0.0.1:9"]) == 2
    assert "`gitcap submit JOB.yaml --address http://127.0.0.1:9`" in capsys.readouterr().err


def test_status_names_the_storage_failure_in_one_line(tmp_path, s3_server, s3_bucket, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": nowhere},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    assert main(["status", "s3://bucket/out", "--storage-options", json.dumps(unreachable)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gitcap status: cannot read s3://bucket/out: endpoint unreachable") and err.count("\n") == 1

    anonymous = {"client_kwargs": s3_server.storage_options["client_kwargs"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert main(["status", f"s3://{s3_bucket}/out", "--storage-options", json.dumps(anonymous)]) == 1
    err = capsys.readouterr().err
    assert "no credentials found" in err and err.count("\n") == 1
