"""storage.Folder: a folder's files are read, listed and deleted by their exact names, locally and
on a real S3 server, whatever characters the folder's name holds (`[`, `*` and `?` are globs to
much of fsspec)."""

from __future__ import annotations

import socket

import pytest

from pipeline.storage import Folder, storage_error_cause

ODD_NAMES = [("out[1]", "out1"), ("o*t", "oXt"), ("o?t", "oYt")]  # a folder, and a sibling its name matches as a glob


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """Where the folders go, and the storage options that reach it."""
    if request.param == "local":
        return str(tmp_path), None
    s3_server = request.getfixturevalue("s3_server")
    return f"s3://{request.getfixturevalue('s3_bucket')}", s3_server.storage_options


def folder_and_sibling(base, name: str, sibling: str) -> tuple[Folder, Folder]:
    root, options = base
    folder, other = Folder(f"{root}/{name}", options), Folder(f"{root}/{sibling}", options)
    folder.write_json("commits/a.json", {"folder": name})
    other.write_json("commits/a.json", {"folder": sibling})
    return folder, other


@pytest.mark.parametrize("name, sibling", ODD_NAMES)
def test_read_many_reads_this_folders_files_not_the_ones_its_name_matches(base, name, sibling):
    folder, _ = folder_and_sibling(base, name, sibling)
    found = folder.read_many(["commits/a.json"])
    assert list(found) == ["commits/a.json"] and b'"folder": "' + name.encode() in found["commits/a.json"]


@pytest.mark.parametrize("name, sibling", ODD_NAMES)
def test_delete_deletes_this_folders_file_only(base, name, sibling):
    folder, other = folder_and_sibling(base, name, sibling)
    folder.delete("commits/a.json")
    assert not folder.exists("commits/a.json") and other.exists("commits/a.json")
    folder.delete("commits/a.json")  # already gone: nothing to do


@pytest.mark.parametrize("name, sibling", ODD_NAMES)
def test_listing_names_this_folders_files(base, name, sibling):
    folder, _ = folder_and_sibling(base, name, sibling)
    folder.write_json("commits/b.json", {})
    assert sorted(folder.list("commits", suffix=".json")) == ["commits/a.json", "commits/b.json"]


def test_read_many_leaves_out_files_gone_since_listing(base):
    root, options = base
    folder = Folder(f"{root}/out", options)
    for name in ["a", "b", "c"]:
        folder.write_json(f"runs/{name}.json", {"run": name})
    names = list(folder.list("runs"))
    folder.delete("runs/b.json")
    assert sorted(folder.read_many(names)) == ["runs/a.json", "runs/c.json"]
    assert folder.read_many([]) == {}


def test_read_many_raises_when_the_storage_fails_rather_than_leave_files_out(s3_server):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    folder = Folder("s3://some-bucket/out", options)
    with pytest.raises(Exception) as info:  # noqa: PT011  (whatever botocore raises: not "gone")
        folder.read_many(["runs/a.json"])
    assert storage_error_cause(info.value).startswith("endpoint unreachable")
