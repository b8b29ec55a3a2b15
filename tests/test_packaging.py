"""pyproject: the cpu / gpu extras pin the Makefile's matrix, the version is mdlora.__version__,
README shows the install that works (torchrec after the cpu extra, without its CUDA fbgemm-gpu),
LICENSE is the Apache-2.0 text pyproject names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import mdlora
from tests.infra.test_manifests import makefile_pins

ROOT = Path(__file__).resolve().parents[1]
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
