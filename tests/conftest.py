"""Shared fixtures: a real S3-compatible server on 127.0.0.1 (moto), reached like any user's S3."""

from __future__ import annotations

import os
import uuid

import pytest

# Fake credentials and no instance-metadata probing, set before any AWS client (or Ray worker)
# exists, so nothing here can ever reach a real AWS endpoint.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


class S3Server:
    """A running moto server: its endpoint, and fsspec options that reach it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    @property
    def storage_options(self) -> dict:
        return {
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def new_bucket(self) -> str:
        """A fresh, empty bucket, so tests never see each other's objects."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        # Not fs.mkdir: s3fs sends us-east-1 as a LocationConstraint, which S3 (and moto) reject.
        self.filesystem().call_s3("create_bucket", Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.new_bucket()
