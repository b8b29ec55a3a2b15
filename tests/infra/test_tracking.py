"""The tracking module on its own: where a job's tracking goes, an MLflow run read back with
``MlflowClient`` (params, metrics with steps, tags, a text artefact), the TensorBoard event file
read back, a failed job's run, tracking off, and a bad ``tracking.uri`` refused at once."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import pytest

from mdlora.config import ConfigError
from mdlora.infra import tracking
from mdlora.trainer.config import OutputConfig, RunConfig, TrackingConfig
from tests.conftest import free_port


def read_events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``directory``: ``{tag: [(step, value)]}``.

    The files are TFRecords (u64 length, u32 crc, data, u32 crc) of ``Event`` protos.
    """
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def client_of(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root}/tracking/mlflow.db")


def only_run(root: Path, experiment: str = "mdlora-m", **filters: str):
    client = client_of(root)
    exp = client.get_experiment_by_name(experiment)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    (run,) = client.search_runs([exp.experiment_id], query)
    return client, run


def test_target_defaults_to_an_embedded_store_under_a_local_root(tmp_path):
    t = tracking.target(TrackingConfig(), OutputConfig(root=str(tmp_path), model="m"))
    assert t == tracking.Target(f"sqlite:///{tmp_path}/tracking/mlflow.db", "mdlora-m",
                                f"{tmp_path}/tracking/tensorboard", f"{tmp_path}/tracking/artifacts")
    own = tracking.target(TrackingConfig(uri="sqlite:////data/x/mlflow.db", experiment="e"), OutputConfig())
    assert (own.uri, own.experiment, own.tensorboard) == ("sqlite:////data/x/mlflow.db", "e", "/data/x/tensorboard")
    server = tracking.target(TrackingConfig(uri="http://mlflow:5000"), OutputConfig(root=str(tmp_path)))
    assert server.tensorboard == f"{tmp_path}/tracking/tensorboard"
    assert tracking.target(TrackingConfig(enabled=False), OutputConfig(root=str(tmp_path))) is None


def test_an_s3_root_without_a_uri_runs_untracked_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mdlora.tracking"):
        assert tracking.target(TrackingConfig(), OutputConfig(root="s3://b/reg")) is None
    assert "tracking.uri" in caplog.text
    assert tracking.start(TrackingConfig(), OutputConfig(root="s3://b/reg"), job="score", name="x") is tracking.OFF


def test_a_run_reads_back_from_the_store_and_the_event_file(tmp_path):
    out = OutputConfig(root=str(tmp_path), model="m")
    with tracking.track(TrackingConfig(), out, job="pretrain", name="r1", tags={"mdlora.run_key": "k1"}) as t:
        t.params(RunConfig())
        tracking.log_history(t, [{"step": 5, "epoch": 0, "wauc": 0.6, "auc": 0.61, "logloss": 0.5,
                                  "val": {"domains": {"a": {"auc": 0.7, "logloss": 0.4, "n": 10}, "b": {"auc": None}}}},
                                 {"step": 10, "epoch": 1, "wauc": 0.65, "val": {"domains": {"a": {"auc": 0.75}}}}],
                             losses=[[5, 0.69], [10, 0.6]])
        t.tags({"mdlora.backbone_hash": "abc", "mdlora.empty": ""})
        t.text("| domain | auc |\n", "table.md")
    client, run = only_run(tmp_path, **{"mdlora.run_key": "k1"})
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["loop.epochs"] == "1" and run.data.params["model.hidden"] == "[256, 128]"
    assert run.data.params["tracking.enabled"] == "True"
    assert run.data.tags["mdlora.job"] == "pretrain" and run.data.tags["mdlora.model"] == "m"
    assert run.data.tags["mdlora.backbone_hash"] == "abc" and "mdlora.empty" not in run.data.tags
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("val/a/auc") == [(5, 0.7), (10, 0.75)]
    assert history("val/wauc") == [(5, 0.6), (10, 0.65)]
    assert history("train/loss") == [(5, 0.69), (10, 0.6)]
    assert "val/b/auc" not in run.data.metrics  # undefined (one class): not logged
    path = client.download_artifacts(run.info.run_id, "table.md", str(tmp_path / "dl"))
    assert Path(path).read_text() == "| domain | auc |\n"
    events = read_events(tmp_path / "tracking" / "tensorboard" / "mdlora-m" / "r1")
    assert events["val/a/auc"] == [(5, pytest.approx(0.7)), (10, pytest.approx(0.75))]


def test_a_failed_job_leaves_a_failed_run(tmp_path):
    out = OutputConfig(root=str(tmp_path), model="m")
    with pytest.raises(RuntimeError, match="boom"), tracking.track(TrackingConfig(), out, job="adapt", name="r2"):
        raise RuntimeError("boom")
    assert only_run(tmp_path)[1].info.status == "FAILED"


def test_tracking_off_writes_nothing(tmp_path):
    off = TrackingConfig(enabled=False)
    with tracking.track(off, OutputConfig(root=str(tmp_path)), job="adapt", name="r") as t:
        t.metrics({"x": 1.0})
        assert not t.active
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["nosuch://store", "http://127.0.0.1:{port}"])
def test_a_bad_uri_is_refused_at_once_naming_tracking_uri(tmp_path, uri):
    uri = uri.format(port=free_port())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="tracking.uri") as err:
        tracking.start(TrackingConfig(uri=uri), OutputConfig(root=str(tmp_path)), job="pretrain", name="r")
    assert uri in str(err.value) and time.monotonic() - t0 < 30


def test_flatten_names_every_leaf_by_its_dotted_key():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": "x"}) == {
        "a.b": "1", "a.c.d": "[1, 2]", "a.e": "{}", "f": "x"}


def test_a_retrain_takes_its_tracking_from_pretrain():
    from mdlora.trainer.config import load_retrain_config

    gate = ["gate.holdout=h"]
    with pytest.raises(ConfigError, match="adapt.tracking: taken from pretrain.tracking"):
        load_retrain_config(None, gate + ["adapt.tracking.experiment=x"])
    assert load_retrain_config(None, gate + ["pretrain.tracking.experiment=x"]).pretrain.tracking.experiment == "x"
