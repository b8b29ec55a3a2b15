"""Names that end up in file paths (domains, tables, features, models) are checked in one place."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_name(value: str, what: str) -> str:
    """Refuse names that are empty or could act as a path (``../x``, ``/``, spaces).

    Args:
        value: the candidate name (domain, table, feature, model).
        what: how to call it in the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: the name holds characters outside ``[A-Za-z0-9_.-]``, starts with ``.``/``-``
            or is ``..``.
    """
    if not isinstance(value, str) or not _NAME.match(value) or value in {".", ".."}:
        raise ValueError(
            f"{what} {value!r}: only letters, digits, '_', '-' and '.' are allowed "
            "(it is used in file paths), and it must not start with '.' or '-'"
        )
    return value
