"""Deployment artefacts (infra/cluster, infra/k8s, infra/docker, infra/runtime_env.yaml, README).

* the Ray cluster-launcher YAML passes Ray's own schema (``ray/autoscaler/ray-schema.json``)
  and Ray's config preparation, with a CPU and a GPU worker type;
* the Kubernetes manifests have the expected kinds and apiVersions, the Ray token and S3
  credentials only through ``secretKeyRef``, and the run configs in the ConfigMap load;
* every ``mdlora <command>`` they (and the Dockerfiles and README) run parses with the real CLI;
  the CronJob's shell script is run with a stand-in ``mdlora`` to check its date window;
* version pins equal the Makefile's; nothing that looks like a credential is written anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

from mdlora.infra.submit import EXCLUDES, job_runtime_env, load_runtime_env
from mdlora.jobs.cli import build_parser
from mdlora.trainer.config import load_adapt_config, load_retrain_config, load_run_config

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "infra/k8s").glob("*.yaml"))
CLUSTER = ROOT / "infra/cluster/cluster.yaml"
DOCKERFILES = sorted((ROOT / "infra/docker").glob("Dockerfile.*"))
RUNTIME_ENV = ROOT / "infra/runtime_env.yaml"
ARTEFACTS = [*K8S, CLUSTER, *DOCKERFILES, RUNTIME_ENV, ROOT / ".dockerignore"]
KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob"),
         ("v1", "ConfigMap"), ("v1", "ServiceAccount")}
LOADERS = {"pretrain": load_run_config, "adapt": load_adapt_config, "retrain": load_retrain_config}
PACKAGES = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for p in K8S for d in docs(p)]


def walk(node, key=None):
    """Yield ``(key, value)`` for every mapping entry and list item below ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield key, v
            yield from walk(v, key)


def makefile_pins() -> dict[str, str]:
    pins = dict(re.findall(r"^(\w+_VER)\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE))
    assert {"TORCH_VER", "FBGEMM_VER", "TORCHREC_VER", "RAY_VER"} <= set(pins), pins
    return pins


# ---- mdlora command lines ---------------------------------------------------------------------


def mdlora_commands(text: str) -> list[list[str]]:
    """The argument lists of every ``mdlora ...`` shell command in ``text``."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for seg in re.split(r"&&|\|\||;|\|", line):
            if not re.search(r"(^|\s)mdlora(\s|$)", seg):
                continue
            toks = shlex.split(seg, comments=True)
            while toks and (re.fullmatch(r"[A-Za-z_]\w*=.*", toks[0]) or toks[0] in ("exec", "env")):
                toks = toks[1:]
            if toks[:1] != ["mdlora"] and "--" in toks:  # `ray job submit ... -- mdlora <job>`
                toks = toks[toks.index("--") + 1:]
            if len(toks) > 1 and toks[0] == "mdlora":  # a bare "mdlora" is a name (labels, users)
                found.append([t for t in toks[1:] if not re.match(r"\d?>", t)])
    return found


def dockerfile_commands(text: str) -> list[list[str]]:
    """``mdlora`` commands of a Dockerfile: shell-form instructions and JSON-form CMD/ENTRYPOINT."""
    found = []
    for m in re.finditer(r"^(?:CMD|ENTRYPOINT)\s+(\[.*\])\s*$", text, re.MULTILINE):
        argv = json.loads(m.group(1))
        if argv[0] == "mdlora":
            found.append(argv[1:])
    shell = re.sub(r"^(?:CMD|ENTRYPOINT)\s+\[.*\]\s*$", "", text, flags=re.MULTILINE)
    return found + mdlora_commands(re.sub(r"^\s*#.*$", "", shell, flags=re.MULTILINE))


def check_command(args: list[str]) -> str:
    """Parse ``mdlora <args>`` with the real CLI (the inner job of ``submit`` too); returns the command."""
    assert args, "bare `mdlora`"
    if args[0] in ("-h", "--help"):
        return "--help"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            ns = build_parser(args[0]).parse_args(args)
        except SystemExit as e:
            pytest.fail(f"`mdlora {shlex.join(args)}` does not parse (exit {e.code}): {stderr.getvalue()}")
    if ns.command == "submit":
        job = ns.job[1:] if ns.job[:1] == ["--"] else ns.job
        return f"submit:{check_command(job)}"
    return ns.command


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return [c for b in blocks for c in mdlora_commands(b)]


def yaml_commands(path: Path) -> list[list[str]]:
    return [c for d in docs(path) for _, v in walk(d) if isinstance(v, str) for c in mdlora_commands(v)]


EXPECTED = {
    "rayjob-pretrain.yaml": {"pretrain"},
    "rayjob-adapt.yaml": {"adapt"},
    "retrain-cronjob.yaml": {"submit:retrain"},
    "Dockerfile.cpu": {"--help"},
    "Dockerfile.cuda": {"--help"},
    "README.md": {"submit:pretrain", "submit:adapt", "submit:score", "add-domain", "retrain"},
}


@pytest.mark.parametrize("path", [*K8S, CLUSTER, RUNTIME_ENV, *DOCKERFILES, ROOT / "README.md"],
                         ids=lambda p: p.name)
def test_every_mdlora_command_is_a_real_subcommand(path):
    if path.name.startswith("Dockerfile"):
        cmds = dockerfile_commands(path.read_text())
    elif path.name == "README.md":
        cmds = readme_commands()
    else:
        cmds = yaml_commands(path)
    seen = {check_command(c) for c in cmds}
    assert EXPECTED.get(path.name, set()) <= seen, (path.name, seen)


def test_the_command_check_rejects_unknown_commands_and_options():
    assert mdlora_commands("a=1 mdlora submit --address $X --wait -- retrain --window \"$s..$e\" >/dev/null") == [
        ["submit", "--address", "$X", "--wait", "--", "retrain", "--window", "$s..$e"]]
    assert mdlora_commands("pip install -e /opt/mdlora && cd mdlora-x") == []
    assert mdlora_commands("ray job submit --address u -- mdlora score --config c") == [["score", "--config", "c"]]
    for bad in (["pretrain"], ["pretrain", "--config", "c", "--bogus"], ["frobnicate"],
                ["submit", "--address", "u", "--", "adapt", "--config"]):
        with pytest.raises(pytest.fail.Exception):
            check_command(bad)


def test_the_retrain_cronjob_script_computes_a_window_ending_yesterday(tmp_path):
    (cron,) = [d for d in k8s_docs() if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value", "stand-in") for e in c["env"]}
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "mdlora").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (stub / "mdlora").chmod(0o755)
    out = tmp_path / "args"
    run_env = {"PATH": f"{stub}:{os.environ['PATH']}", "ARGS_OUT": str(out), **env}
    proc = subprocess.run([*c["command"], *c["args"]], env=run_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = out.read_text().splitlines()
    assert check_command(args) == "submit:retrain"
    window = args[args.index("--window") + 1]
    start, end = (dt.date.fromisoformat(x) for x in window.split(".."))
    today = dt.datetime.now(dt.timezone.utc).date()
    assert end == today - dt.timedelta(days=1)
    assert (end - start).days + 1 == int(env["WINDOW_DAYS"])
    assert args[args.index("--address") + 1] == env["RAY_JOB_API"] == "http://mdlora-head-svc:8265"
    assert c["workingDir"] == "/opt/mdlora" and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_readme_config_examples_load(tmp_path):
    """README's config blocks (``# pretrain.yaml``, ``# adapt.yaml``, the retrain one) load typed."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    kinds = {"pretrain": [b for b in blocks if b.startswith("# pretrain.yaml")],
             "adapt": [b for b in blocks if b.startswith("# adapt.yaml")],
             "retrain": [b for b in blocks if b.startswith(("pretrain:", "# retrain.yaml"))]}
    for kind, found in kinds.items():
        assert found, f"README has no {kind} config example"
        for i, text in enumerate(found):
            (tmp_path / f"{kind}{i}.yaml").write_text(text)
            LOADERS[kind](str(tmp_path / f"{kind}{i}.yaml"), [])


# ---- Kubernetes -------------------------------------------------------------------------------


def test_manifests_have_known_kinds_and_api_versions():
    found = {(d.get("apiVersion"), d.get("kind")) for d in k8s_docs()}
    assert found <= KINDS, found - KINDS
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob")} <= found
    for d in k8s_docs():
        assert re.fullmatch(r"[a-z0-9-]+", d["metadata"]["name"]), d["metadata"]


def containers(doc: dict) -> list[dict]:
    return [c for k, v in walk(doc) if k == "containers" and isinstance(v, dict) for c in [v]]


def test_raycluster_has_cpu_and_gpu_worker_groups_on_the_pinned_ray():
    (rc,) = [d for d in k8s_docs() if d["kind"] == "RayCluster"]
    spec = rc["spec"]
    assert spec["rayVersion"] == makefile_pins()["RAY_VER"]
    gpu = {g["groupName"]: any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                               for c in g["template"]["spec"]["containers"]) for g in spec["workerGroupSpecs"]}
    assert sorted(gpu.values()) == [False, True], gpu
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        image = g["template"]["spec"]["containers"][0]["image"]
        assert image.endswith("-cuda" if gpu[g["groupName"]] else "-cpu"), image
    head = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    (config_vol,) = [v for v in head["volumes"] if "configMap" in v]
    assert mounts[config_vol["name"]] == "/etc/mdlora" and config_vol["configMap"]["name"] == "mdlora-config"
    for job in (d for d in k8s_docs() if d["kind"] == "RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}


def test_every_container_gets_the_ray_token_and_credentials_only_from_secrets():
    checked = 0
    for d in k8s_docs():
        envs = [c.get("env", []) for c in containers(d)]
        if d["kind"] == "RayCluster":
            envs.append(d["spec"]["autoscalerOptions"]["env"])
        for env in envs:
            by_name = {e["name"]: e for e in env}
            assert by_name["RAY_AUTH_MODE"].get("value") == "token"
            for name, e in by_name.items():
                if SECRET_NAME.search(name) and name != "RAY_AUTH_MODE":
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (d["metadata"]["name"], name)
            assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mdlora-ray-token"
            checked += 1
    assert checked >= 7  # autoscaler, head, 2 worker groups, 2 RayJob submitters, CronJob


def test_the_configmap_configs_load_and_every_config_path_used_exists(tmp_path):
    (cm,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap"]
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
        LOADERS[name.removesuffix(".yaml")](str(tmp_path / name), [])  # typed load: unknown keys fail
    used = {m for p in K8S for m in re.findall(r"--config\s+/etc/mdlora/(\S+)", p.read_text())}
    assert {"pretrain.yaml", "adapt.yaml", "retrain.yaml"} <= used <= set(cm["data"]), used


# ---- Ray cluster launcher ---------------------------------------------------------------------


def ray_schema() -> dict:
    (pkg,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads((Path(pkg) / "autoscaler" / "ray-schema.json").read_text())


def validate_cluster(config: dict) -> None:
    """Ray's JSON schema, then what `ray up` runs before it talks to the cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_schema_with_cpu_and_gpu_worker_types():
    (config,) = docs(CLUSTER)
    validate_cluster(config)
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    own = {k: " ".join(v.get("worker_setup_commands", config["setup_commands"])) for k, v in workers.items()}
    assert sorted("fbgemm-gpu==" in c for c in own.values()) == [False, True], own
    assert all("fbgemm-gpu-cpu==" in c for c in own.values() if "fbgemm-gpu==" not in c)
    mounted = [p for p in config["file_mounts"].values() if p.startswith("./")]
    assert mounted and all((ROOT / p).exists() for p in mounted), mounted
    assert PACKAGES <= {Path(p).name for p in mounted}, PACKAGES  # every package reaches the nodes
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token" in cmd, cmd


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["cpu-worker"].update(min_worker=1),   # a typo'd key
    lambda c: c["available_node_types"]["gpu-worker"].update(resources={"GPU": "one"}),
    lambda c: c.update(head_node_type="nope"),
    lambda c: c.update(max_workers=0),                                        # < sum of min_workers
])
def test_the_cluster_check_rejects_broken_configs(break_it):
    (config,) = docs(CLUSTER)
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_cluster(config)


# ---- version pins -----------------------------------------------------------------------------

PIN = re.compile(r"(?<![\w-])(torch|fbgemm-gpu-cpu|fbgemm-gpu|torchrec|ray(?:\[[\w,]+\])?)==([\w.]+)")
PIN_VAR = {"torch": "TORCH_VER", "fbgemm-gpu": "FBGEMM_VER", "fbgemm-gpu-cpu": "FBGEMM_VER",
           "torchrec": "TORCHREC_VER", "ray": "RAY_VER"}


@pytest.mark.parametrize("path", [*DOCKERFILES, CLUSTER], ids=lambda p: p.name)
def test_version_pins_equal_the_makefiles(path):
    pins, text = makefile_pins(), path.read_text()
    found = PIN.findall(text)
    for pkg, ver in found:
        assert ver == pins[PIN_VAR[pkg.split("[")[0]]], f"{path.name}: {pkg}=={ver}"
    names = {pkg.split("[")[0] for pkg, _ in found}
    assert {"torch", "torchrec", "ray"} <= names and names & {"fbgemm-gpu", "fbgemm-gpu-cpu"}, names
    assert ("fbgemm-gpu" in names) == (path.name != "Dockerfile.cpu")
    assert "ray[default,train]==" in text
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        if "torchrec==" in line:
            assert "--no-deps torchrec==" in line, f"{path.name}: torchrec without --no-deps: {line.strip()}"


def test_images_and_cluster_nodes_share_one_python_and_the_cuda_image_is_cuda():
    """Ray needs one Python (major.minor) on every node of a cluster."""
    cpu, cuda = (ROOT / "infra/docker/Dockerfile.cpu").read_text(), (ROOT / "infra/docker/Dockerfile.cuda").read_text()
    versions = {re.search(r"^FROM python:(\d+\.\d+)-", cpu, re.MULTILINE).group(1),
                *re.findall(r"--python (\d+\.\d+)", cuda), *re.findall(r"--python (\d+\.\d+)", CLUSTER.read_text())}
    assert len(versions) == 1, versions
    assert re.search(r"^FROM nvidia/cuda:\S+", cuda, re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in cpu and "fbgemm-gpu-cpu==" in cpu
    assert all(PACKAGES <= set(re.findall(r"^COPY --chown=ray (\w+) \1$", t, re.MULTILINE)) for t in (cpu, cuda))


def test_the_pin_check_catches_a_drift():
    assert PIN.findall('pip install torch==2.12.0 "ray[default,train]==2.59.0" fbgemm-gpu==1.7.0 mytorch==9') == [
        ("torch", "2.12.0"), ("ray[default,train]", "2.59.0"), ("fbgemm-gpu", "1.7.0")]


# ---- credentials ------------------------------------------------------------------------------

LEAKS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                                  # AWS access key id
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}", re.IGNORECASE),
    re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)\w*['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=_-]{16,}", re.IGNORECASE),
    re.compile(r"--from-literal=\w+=(?!\.\.\.)[^\s'\"]+"),                          # a filled-in kubectl secret
]


def leaks(text: str) -> list[str]:
    return [m.group(0) for r in LEAKS for m in r.finditer(text)]


@pytest.mark.parametrize("path", [*ARTEFACTS, ROOT / "README.md"], ids=lambda p: p.name)
def test_no_credentials_in_artefacts(path):
    assert leaks(path.read_text()) == []


def test_the_credential_scan_catches_literals():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"
    for text in (f"AWS_ACCESS_KEY_ID={key_id}", "aws_secret_access_key: wJalrXUtnFEMIK7MDENGbPxRfiCY",
                 "RAY_AUTH_TOKEN: 0123456789abcdef0123", "--from-literal=auth_token=hunter2"):
        assert leaks(text), text
    assert leaks("valueFrom: {secretKeyRef: {name: mdlora-s3, key: AWS_SECRET_ACCESS_KEY}}") == []


def test_runtime_env_example_loads_and_holds_no_credential_names():
    env = load_runtime_env(str(RUNTIME_ENV))
    assert env["working_dir"] == "." and env["env_vars"]
    assert not [k for k in env["env_vars"] if SECRET_NAME.search(k)]


def test_job_runtime_env_merges_the_file_under_the_command_line():
    base = {"working_dir": "src", "excludes": ["tests/"], "env_vars": {"A": "file", "B": "file"}, "pip": ["x"]}
    env = job_runtime_env(base, None, {"B": "cli"})
    assert env == {"working_dir": "src", "excludes": [*EXCLUDES, "tests/"], "env_vars": {"A": "file", "B": "cli"},
                   "pip": ["x"]}
    assert job_runtime_env(base, "other", None)["working_dir"] == "other"
    assert job_runtime_env(None, None, None) == {"working_dir": ".", "excludes": EXCLUDES, "env_vars": {}}
    assert base["env_vars"] == {"A": "file", "B": "file"}  # the caller's dict is not modified


@pytest.mark.parametrize("text, error", [
    ("- just\n- a list\n", "expected a mapping"),
    ("working_dir: .\nwrking_dir: x\n", "unknown runtime_env field(s) ['wrking_dir']"),
    ("env_vars: {A: 1}\n", "env_vars"),
])
def test_load_runtime_env_names_the_file_and_the_problem(tmp_path, text, error):
    bad = tmp_path / "env.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=re.escape(error)) as e:
        load_runtime_env(str(bad))
    assert str(bad) in str(e.value)
