"""The installed distribution and how it is installed.

* It claims no top-level import name but ``mdlora``, so it installs beside AdapterHub's
  ``adapters`` (and the PyPI ``trainer`` / ``embeddings`` projects).
* pyproject: the cpu / gpu extras pin the Makefile's matrix, the version is mdlora.__version__,
  README shows the install that works (torchrec after the cpu extra, without its CUDA
  fbgemm-gpu), LICENSE is the Apache-2.0 text pyproject names.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import mdlora
from tests.infra.test_manifests import makefile_pins

ROOT = Path(__file__).resolve().parents[1]
OURS = ("adapters", "trainer", "embeddings", "jobs", "infra")

CHECK = """
import importlib.util, json, sys
# no editable install of the checkout: only what the wheel put in the target directory
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
import adapters                                  # AdapterHub
import mdlora, mdlora.adapters.lora, mdlora.jobs.cli, mdlora.infra.artifacts, mdlora.trainer.recipes
print(json.dumps({
    "adapterhub": adapters.__file__, "adapterhub_lora": hasattr(adapters, "LoRAConfig"),
    "mdlora": mdlora.__file__, "ours": mdlora.adapters.lora.__file__, "cli": mdlora.jobs.cli.__file__,
    "top": {n: importlib.util.find_spec(n) is not None for n in ("trainer", "embeddings", "jobs", "infra")},
}))
"""


def _pip(*args: str, timeout: int = 600) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.integration
def test_wheel_installs_beside_adapterhub(tmp_path):
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT))
    (wheel,) = (tmp_path / "dist").glob("mdlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mdlora", wheel.name.split("-py")[0] + ".dist-info"}
    sources = {f"mdlora/{p.relative_to(ROOT)}" if p.parts[len(ROOT.parts)] != "mdlora" else str(p.relative_to(ROOT))
               for pkg in ("mdlora", *OURS) for p in (ROOT / pkg).rglob("*.py")}
    assert sources - set(names) == set(), "modules missing from the wheel"
    configs = {f"mdlora/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and configs - set(names) == set(), "example configs missing from the wheel"
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["mdlora"]

    site = tmp_path / "site"  # AdapterHub (+ transformers) and our wheel, nothing from the checkout
    _pip("install", "--target", str(site), "adapters")
    _pip("install", "--no-deps", "--target", str(site), str(wheel))
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["adapterhub"] == str(site / "adapters" / "__init__.py") and out["adapterhub_lora"]
    assert out["mdlora"] == str(site / "mdlora" / "__init__.py")
    assert out["ours"] == str(site / "mdlora" / "adapters" / "lora.py")
    assert out["cli"] == str(site / "mdlora" / "jobs" / "cli.py")
    assert not any(out["top"].values()), out["top"]


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_pin_the_makefiles_matrix():
    pins, project = makefile_pins(), PROJECT["project"]
    extras = {
        k: sorted(map(str, map(Requirement, v)))
        for k, v in project["optional-dependencies"].items()
    }
    assert extras["cpu"] == [
        f"fbgemm-gpu-cpu=={pins['FBGEMM_VER']}"
    ]  # no torchrec: it pulls fbgemm-gpu
    assert extras["gpu"] == [
        f"fbgemm-gpu=={pins['FBGEMM_VER']}",
        f"torchrec=={pins['TORCHREC_VER']}",
    ]
    deps = {r.name: r for r in map(Requirement, project["dependencies"])}
    assert deps["torch"].specifier.contains(pins["TORCH_VER"])
    assert deps["ray"].specifier.contains(pins["RAY_VER"])
    made = re.search(r'"torchmetrics==([\d.]+)"', (ROOT / "Makefile").read_text()).group(1)
    assert str(deps["torchmetrics"].specifier) == f"=={made}"  # torchrec's pin; it has --no-deps


def test_the_version_is_the_packages():
    assert PROJECT["project"]["dynamic"] == ["version"] and "version" not in PROJECT["project"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mdlora.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", mdlora.__version__)


def test_readme_installs_torchrec_after_the_cpu_extra_without_its_deps():
    text = (ROOT / "README.md").read_text()
    cpu = text.index('pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]"')
    torchrec = text.index(f"pip install --no-deps torchrec=={makefile_pins()['TORCHREC_VER']}\n")
    assert cpu < torchrec and 'pip install ".[gpu]"' in text


def test_license_is_the_apache_2_text():
    assert PROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert re.match(r"\s+Apache License\n\s+Version 2\.0, January 2004\n", text)
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 201


def test_the_makefile_installs_every_dependency_pyproject_declares():
    """``make setup`` installs the project with --no-deps: its pip line must name every dependency."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "pip install" in x and "torch==$(TORCH_VER)" in x)
    made = {re.split(r"[=<>\[]", w.strip('"'))[0].lower() for w in line.split()}
    declared = {Requirement(d).name.lower() for d in PROJECT["project"]["dependencies"]}
    assert declared <= made, sorted(declared - made)
    for path in [*(ROOT / "infra/docker").glob("Dockerfile.*"), ROOT / "infra/cluster/cluster.yaml"]:  # -e . --no-deps
        assert all(name in path.read_text() for name in ("mlflow-skinny==", "sqlalchemy", "alembic", "tensorboardX")), path


def test_the_example_configs_ship_in_the_wheel_and_config_examples_lists_them(capsys):
    setuptools = PROJECT["tool"]["setuptools"]
    assert "mdlora.configs" in setuptools["packages"] and setuptools["package-dir"]["mdlora.configs"] == "configs"
    from mdlora.jobs.cli import main

    assert main(["config", "examples"]) == 0
    listed = capsys.readouterr().out.split()
    shipped = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
    assert sorted(Path(p).relative_to(Path(listed[0]).parent) for p in listed) == [Path(p) for p in shipped]
