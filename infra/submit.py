"""Submit an ``mdlora`` job to a Ray cluster through the Ray Jobs API (``JobSubmissionClient``).

The working dir is uploaded as the job's ``runtime_env`` (Ray puts it first on the job's
``PYTHONPATH`` and makes it the cwd), minus virtual envs, git data and run outputs. The
entrypoint is ``mdlora <args>`` (shell-quoted), so ``mdlora`` must be on the cluster's ``PATH``
(``infra/scripts/ray-head-start.sh`` puts the venv's ``bin`` there).

Token auth (the default in Ray 2.60): with ``RAY_AUTH_MODE=token`` in this process, the SDK sends
``Authorization: Bearer <token>`` read from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``. A cluster with token auth refuses requests without it (HTTP 401), which
is raised here as :class:`PermissionError`. The token itself is never printed.

Credentials never travel with a job: Ray stores a job's ``runtime_env`` (its ``env_vars``
included) with the job, where the dashboard and every job API client can read it, so an
environment variable whose name looks like a credential (``KEY``, ``SECRET``, ``TOKEN``,
``PASSWORD``) is refused. The cluster's nodes get their credentials from their own environment.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from typing import Any

import yaml

EXCLUDES = [".venv", ".git", "demo-out", "runs", "registry", "benchmarks/results", "__pycache__", ".pytest_cache",
            ".ruff_cache", "*.egg-info", "build", ".whl", ".gl"]
"""Paths (gitignore syntax) never uploaded with the working dir."""

_SECRET = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def load_runtime_env(path: str) -> dict[str, Any]:
    """Read a ``runtime_env`` YAML file, the format of ``ray job submit --runtime-env FILE``.

    Args:
        path: local YAML file holding one mapping of Ray ``runtime_env`` fields
            (``working_dir``, ``excludes``, ``env_vars``, ``pip``, ``image_uri``, ...).

    Returns:
        The mapping, checked by Ray's own ``RuntimeEnv`` (field types).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a mapping, an unknown field, or a field of the wrong type (names the file).
    """
    from ray.runtime_env import RuntimeEnv

    with open(path) as f:
        env = yaml.safe_load(f)
    if not isinstance(env, dict):
        raise ValueError(f"{path}: expected a mapping of runtime_env fields, got {type(env).__name__}")
    unknown = sorted(set(env) - RuntimeEnv.known_fields)
    if unknown:
        raise ValueError(f"{path}: unknown runtime_env field(s) {unknown}")
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return env


def job_runtime_env(base: dict[str, Any] | None, working_dir: str | None,
                    env_vars: dict[str, str] | None) -> dict[str, Any]:
    """The runtime_env of a submitted job.

    Args:
        base: runtime_env from a file (:func:`load_runtime_env`) or None; not modified.
        working_dir: wins over ``base["working_dir"]``; neither given: ``.``.
        env_vars: set over ``base["env_vars"]``.

    Returns:
        ``base`` with that working dir, :data:`EXCLUDES` + its ``excludes`` and the merged env.

    Raises:
        ValueError: a variable's name looks like a credential (names it, never its value).
    """
    base = dict(base or {})
    env = {**base.get("env_vars", {}), **(env_vars or {})}
    secret = sorted(k for k in env if _SECRET.search(k))
    if secret:
        raise ValueError(f"job env {secret}: looks like a credential; Ray stores a job's env with the job, "
                         "readable on the dashboard and by every job API client. Give the cluster its "
                         "credentials through its nodes' environment (IAM role / IRSA / a Kubernetes Secret)")
    return {**base, "working_dir": working_dir or base.get("working_dir", "."),
            "excludes": [*EXCLUDES, *base.get("excludes", [])], "env_vars": env}


def submit(address: str, entrypoint_args: list[str], *, working_dir: str | None = None, wait: bool = False,
           env_vars: dict[str, str] | None = None, runtime_env: dict[str, Any] | None = None) -> tuple[str, str]:
    """Submit ``mdlora <entrypoint_args>`` to the Ray cluster at ``address``.

    The job's runtime_env is :func:`job_runtime_env` of ``runtime_env`` (e.g. from
    :func:`load_runtime_env`): ``--working-dir`` wins over the file's, as in ``ray job submit``.

    Args:
        address: the cluster's dashboard / job API, e.g. ``http://127.0.0.1:8265``.
        entrypoint_args: the ``mdlora`` command line, e.g. ``["pretrain", "--config", "c.yaml"]``.
        working_dir: local dir uploaded as the job's working dir (see :data:`EXCLUDES`).
        wait: stream the job's logs to stdout until it ends.
        env_vars: extra environment variables of the job (no credentials: see the module doc).
        runtime_env: base runtime_env of the job (any Ray field: ``pip``, ``image_uri``, ...).

    Returns:
        ``(job_id, status)``: the final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``) with
        ``wait``, else the status right after submission.

    Raises:
        PermissionError: the cluster refused the request (missing or wrong auth token).
        ValueError: ``entrypoint_args`` is empty, or an env variable looks like a credential.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not entrypoint_args:
        raise ValueError("submit: no job given (expected e.g. `-- pretrain --config C`)")
    runtime_env = job_runtime_env(runtime_env, working_dir, env_vars)
    env_vars = runtime_env["env_vars"]
    entrypoint = shlex.join(["mdlora", *entrypoint_args])
    try:
        client = JobSubmissionClient(address)
        job_id = _submit_job(client, entrypoint, runtime_env)
        print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
        if env_vars:
            print(f"  env: {env_vars}", flush=True)
        if not wait:
            return job_id, str(client.get_job_status(job_id).value)
        asyncio.run(_stream(client, job_id))
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can end just before the status flips
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    except AuthenticationError as e:
        raise PermissionError(f"{address}: {str(e).splitlines()[0]}") from e
    print(f"job {job_id} {status.value}", flush=True)
    return job_id, str(status.value)


def _submit_job(client, entrypoint: str, runtime_env: dict, patience_s: float = 60.0) -> str:
    """``client.submit_job``, retried while a just-started head has no job agent yet (HTTP 500)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def _stream(client, job_id: str) -> None:
    """Print the job's log lines as they arrive, until the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)
