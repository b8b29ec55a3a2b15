"""check_writable: the probe that refuses an unwritable output location before any work starts."""

from __future__ import annotations

import uuid

import pytest

from mdlora.infra.storage import check_writable, open_fs


def test_a_missing_local_directory_is_probed_in_its_nearest_parent_and_nothing_is_left(tmp_path):
    check_writable(str(tmp_path / "a" / "b" / "registry"), "output.root")
    assert list(tmp_path.iterdir()) == []  # neither the missing directories nor the probe


def test_a_file_on_the_path_is_named(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output.run_dir: .*plain/runs: .*plain is not a directory"):
        check_writable(str(tmp_path / "plain" / "runs"), "output.run_dir")


def test_s3_prefix_probe_leaves_no_object(s3_env):
    check_writable(f"{s3_env}/mdlora", "output.root")
    fs, bucket = open_fs(s3_env)
    assert fs.find(bucket) == []


def test_a_missing_s3_bucket_is_refused_naming_the_key_and_uri(s3_env):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/m"
    with pytest.raises(FileNotFoundError) as err:  # the CLI: one line, exit 2
        check_writable(uri, "output.root")
    assert str(err.value) == f"output.root: {uri} is not writable (The specified bucket does not exist)"
    assert "testing-secret" not in str(err.value)
