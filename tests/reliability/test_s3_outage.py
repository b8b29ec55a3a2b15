"""The S3 endpoint (a real moto server on 127.0.0.1) stops in the middle of a registry publish
and comes back on the same port with its data (moto keeps objects in this process's memory).

The publisher is a separate process. As soon as its first data file has landed, the server is
stopped: either for one second (the client's retries carry the publish through) or until the
publisher has given up (it must exit non-zero with an error naming the endpoint). Either way no
version whose files are incomplete is ever listed, the secret key appears in no output, and a
new publish afterwards succeeds.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.reliability.conftest import SECRET, py

pytestmark = pytest.mark.integration

FILES = 4
"""Data files of 8 MiB each: uploads take long enough to be cut in the middle."""


class Endpoint:
    """A moto S3 server that can be stopped and restarted on the same port (data kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.bucket = f"mdlora-outage-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._make = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server = self._make()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = self._make()
        self.server.start()

    def keys(self) -> set[str]:
        """Object keys of the bucket, read from moto's in-process backend (no HTTP)."""
        from moto.s3.models import s3_backends

        for partition in s3_backends.values():
            for backend in partition.values():
                if self.bucket in backend.buckets:
                    return set(backend.buckets[self.bucket].keys.keys())
        return set()


@pytest.fixture
def endpoint():
    import s3fs

    ep = Endpoint()
    s3fs.S3FileSystem(key="outage-key", secret=SECRET, skip_instance_cache=True,
                      client_kwargs={"endpoint_url": ep.url, "region_name": "us-east-1"}
                      ).call_s3("create_bucket", Bucket=ep.bucket)
    yield ep
    ep.stop()


def artefact(directory: Path) -> Path:
    from mdlora.infra.artifacts.sealed import seal

    directory.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(FILES):
        (directory / f"shard{i}.bin").write_bytes(rng.bytes(8 << 20))
    seal(directory, {"format_version": 1, "kind": "backbone", "name": "ctr"})
    return directory




@pytest.mark.parametrize("downtime", ["1s", "until_the_job_gives_up"])
def test_publish_survives_or_fails_cleanly(downtime, endpoint, tmp_path, monkeypatch):
    import s3fs

    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs

    env = {"MDLORA_S3_ENDPOINT": endpoint.url, "AWS_ACCESS_KEY_ID": "outage-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    src = artefact(tmp_path / "backbone")
    first = "registry/backbones/ctr/v0001/shard0.bin"
    done, at_stop = threading.Event(), set()

    def outage() -> None:
        deadline = time.monotonic() + 120
        while first not in endpoint.keys() and time.monotonic() < deadline:
            time.sleep(0.002)
        endpoint.stop()
        at_stop.update(endpoint.keys())
        if downtime == "1s":
            time.sleep(1.0)
        else:
            done.wait(120)
        endpoint.restart()

    cutter = threading.Thread(target=outage, daemon=True)
    cutter.start()
    code = ("from mdlora.infra.artifacts.registry import Registry; from mdlora.infra.storage import open_fs; "
            f"print(Registry(*open_fs('s3://{endpoint.bucket}/registry')).publish('backbones', 'ctr', {str(src)!r}))")
    r = py(code, env=env, timeout=180)
    done.set()
    cutter.join(130)
    manifest = "registry/backbones/ctr/v0001/manifest.json"
    assert first in at_stop and manifest not in at_stop  # the outage really began mid-publish ...
    assert SECRET not in r.stdout + r.stderr  # ... and no output shows the secret key

    s3fs.S3FileSystem.clear_instance_cache()
    reg = Registry(*open_fs(f"s3://{endpoint.bucket}/registry"))
    if downtime == "1s":  # retried through the outage: a complete, verified version
        assert r.returncode == 0, r.stderr[-3000:]
        assert reg.versions("backbones", "ctr") == ["v0001"]
        assert reg.verify("backbones", "ctr", "v0001") == []
    else:  # gave up: a clear error naming the endpoint, and no version recorded
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "Could not connect to the endpoint URL" in last and endpoint.url in last, last
        assert manifest not in endpoint.keys()
        assert reg.versions("backbones", "ctr") == []
        assert reg.aliases("backbones", "ctr") == {}
    # the store is back: the next publish succeeds and is complete
    again = reg.publish("backbones", "ctr", src)
    assert reg.versions("backbones", "ctr")[-1] == again and reg.verify("backbones", "ctr", again) == []


def test_a_cli_job_against_a_stopped_endpoint_fails_with_one_clear_line(endpoint, tmp_path):
    """The store is down for the whole command: after the client's retries the command prints one
    line naming the endpoint (no traceback, no secret), exits 1 and writes nothing."""
    from tests.reliability.conftest import cli

    env = {"MDLORA_S3_ENDPOINT": endpoint.url, "AWS_ACCESS_KEY_ID": "outage-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "HOME": str(tmp_path),
           "AWS_MAX_ATTEMPTS": "2"}  # the default retries only make the test longer
    endpoint.stop()
    try:
        r = cli(["bundles", "--root", f"s3://{endpoint.bucket}/registry", "promote", "d00", "v0001"], env=env,
                timeout=300)
    finally:
        endpoint.restart()
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("mdlora bundles: error: storage unreachable: "), err[-5:]
    assert endpoint.url in err[0] and SECRET not in r.stdout + r.stderr
    assert not any(k.startswith("registry/") for k in endpoint.keys())
