"""Shared fixtures: a real moto S3 server on 127.0.0.1, tiny schemas, temp dirs."""

from __future__ import annotations

import os
import socket

import pytest

# Ray Train's controller polls its workers every 2 s by default: each run waits up to a poll to
# see its workers start, to register each reported checkpoint and to see them finish. The suite
# makes ~30 short runs on 2 cores; polling every 0.1 s saves about a sixth of their wall time.
# Every Ray a test starts inherits this (a job cluster's head gets it passed explicitly); the
# product keeps Ray's default, which costs less CPU on long runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 HTTP server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point mdlora's storage at the moto server with test credentials; yields a fresh bucket URI."""
    import uuid

    import s3fs

    monkeypatch.setenv("MDLORA_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-log")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"mdlora-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(
        key="testing-key",
        secret="testing-secret-do-not-log",
        client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"},
    )
    fs.call_s3("create_bucket", Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    """Keep torch to one thread per test process on the 2-core machines."""
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield


@pytest.fixture
def tiny_schema_dict() -> dict:
    """A small schema exercising every feature kind (shared tables, hash/index, multi, dense, aux)."""
    return {
        "name": "tiny",
        "label": "click",
        "domain": {"column": "domain", "values": ["a", "b", "c"]},
        "aux": [{"name": "gender", "column": "gender", "values": ["F", "M"]}],
        "date_column": "date",
        "tables": [
            {"name": "user", "num_embeddings": 100, "dim": 4},
            {"name": "item", "num_embeddings": 50, "dim": 4},
            {"name": "cat", "num_embeddings": 16, "dim": 4},
        ],
        "sparse": [
            {"name": "user_id", "table": "user", "policy": "hash"},
            {"name": "item_id", "table": "item", "policy": "index"},
            {"name": "hist", "column": "hist_items", "table": "item", "policy": "index", "multi": True, "max_len": 3},
            {"name": "city", "table": "cat", "policy": "hash"},
        ],
        "dense": [
            {"name": "price", "norm": "log"},
            {"name": "age", "norm": "standard", "mean": 30.0, "std": 10.0},
        ],
    }
