"""The ``mdlora`` command line: top-level options and the ``config`` command."""

from __future__ import annotations

import pytest

import mdlora
from mdlora.jobs.cli import main


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mdlora {mdlora.__version__}"
