"""mdlora: multi-domain CTR training with per-domain LoRA adapters on TorchRec + Ray.

Import names: ``mdlora.trainer``, ``mdlora.embeddings``, ``mdlora.adapters``, ``mdlora.infra``,
``mdlora.jobs`` and this package's base modules (``mdlora.config``, ``mdlora.atomic``, ...).
The repository keeps those packages as top-level folders (``trainer/``, ``adapters/``, ...); an
installed wheel puts them under ``mdlora/`` (pyproject ``package-dir``), so the distribution
claims no top-level name but ``mdlora`` (``adapters`` is AdapterHub's, ``trainer`` and
``embeddings`` are other PyPI projects too). In a source tree (a checkout, a Ray job's
working_dir, an image that copies the folders) the folders beside this one are this package's
path as well, so the same names import from both.

Imports flow ``jobs -> infra -> trainer -> {embeddings, adapters} -> mdlora`` (base modules);
the base modules import nothing of the others.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_tree = _Path(__file__).resolve().parent.parent
if (_tree / "pyproject.toml").is_file() and (_tree / "trainer" / "__init__.py").is_file():
    __path__.append(str(_tree))  # source tree: mdlora.trainer is <tree>/trainer
del _Path, _tree
