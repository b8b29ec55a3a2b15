"""The module map's import rules, checked on the source (import-linter's contract, by AST).

* packages import only downwards: jobs -> infra -> trainer -> {embeddings | adapters} -> mdlora
  (base modules), each as ``mdlora.<package>`` (never the bare folder name);
* ``ray`` is imported only in ``infra/``;
* model math (``trainer/backbone.py``, ``trainer/task.py``, ``adapters/lora.py``,
  ``adapters/multilora.py``) imports neither torch.distributed nor Ray nor I/O layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"jobs": 4, "infra": 3, "trainer": 2, "embeddings": 1, "adapters": 1, "mdlora": 0}
PURE = ["trainer/backbone.py", "trainer/task.py", "adapters/lora.py", "adapters/multilora.py"]


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def sources() -> list[Path]:
    return [p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))]


def layer_of(name: str) -> str | None:
    """The package of an imported module name: ``mdlora.infra.score`` -> ``infra``; a base module
    (``mdlora.config``) -> ``mdlora``; anything else (torch, ray, ...) -> None."""
    parts = name.split(".")
    if parts[0] != "mdlora":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "mdlora"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_downwards(path):
    pkg = path.relative_to(ROOT).parts[0]
    for name in imports(path):
        top = layer_of(name)
        assert name.split(".")[0] not in set(LAYERS) - {"mdlora"}, (
            f"{path.relative_to(ROOT)} imports {name}: the packages import as mdlora.{name}")
        if top is not None and top != pkg:
            assert LAYERS[top] < LAYERS[pkg], f"{path.relative_to(ROOT)} imports {name} (upwards or sideways)"
        if top == "ray":
            assert pkg == "infra", f"{path.relative_to(ROOT)} imports ray outside infra/"


@pytest.mark.parametrize("rel", PURE)
def test_model_math_is_free_of_distribution_and_io(rel):
    for name in imports(ROOT / rel):
        assert not name.startswith(("torch.distributed", "ray", "mdlora.infra", "pyarrow", "s3fs", "fsspec")), (
            f"{rel} imports {name}")
