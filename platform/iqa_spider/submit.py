"""Run jobs/*.py on a Ray cluster through Ray's Job Submission SDK, and follow them.

    iqa-spider submit annotate --config configs/annotate.yaml input.uri=s3://b/in output.uri=s3://b/dq \
        --address http://head:8265 [--env NAME ...] [--wait]
    iqa-spider jobs status|logs|stop ID [--address URL]

The job runs exactly what `ray job submit -- python jobs/NAME.py --config FILE k=v ...`
runs. The runtime_env (see docs/jobs.md for why):
- working_dir: the repository (jobs/, configs/, platform/), without EXCLUDES and what
  .gitignore / .rayignore name;
- py_modules: platform/iqa_spider, so the package imports on a cluster without it installed;
- env_vars: variables named with --env (plus DEFAULT_ENV), copied from this shell if set;
- a config file outside the working dir (or in an excluded part of it) travels inline:
  its YAML, includes merged, in IQA_SPIDER_SUBMITTED_CONFIG, written to a temp file by the
  entrypoint on the cluster.
"""
from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from iqa_spider.environment import SUBMIT_ENV

# gitwildmatch patterns, relative to the working dir (Ray's `excludes`); Ray's limit is 500 MiB.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", ".cache",
            "demo_out", "mlruns", "mlartifacts", "mlflow.db", "*.parquet", "*.whl"]
# Passed through when set here. Values reach the cluster in the job's runtime_env (visible to
# whoever can read the dashboard); on a production cluster prefer pod secrets and --no-default-env.
DEFAULT_ENV = list(SUBMIT_ENV)
CONFIG_ENV = "IQA_SPIDER_SUBMITTED_CONFIG"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
USAGE_EXIT = 2


class SubmitError(Exception):
    """A submission that cannot go; str() is one line for the user."""


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_root(working_dir: str | None = None) -> Path:
    """The working dir: --working-dir, else the current directory if it has jobs/, else this checkout."""
    if working_dir:
        root = Path(working_dir).expanduser().resolve()
    elif (Path.cwd() / "jobs").is_dir():
        root = Path.cwd().resolve()
    else:
        root = Path(__file__).resolve().parents[2]
    if not (root / "jobs").is_dir():
        raise SubmitError(f"{root} has no jobs/ folder: run from the repository or pass --working-dir")
    return root


def job_script(root: Path, name: str) -> str:
    script = root / "jobs" / f"{name}.py"
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not script.is_file():
        have = ", ".join(sorted(p.stem for p in (root / "jobs").glob("*.py"))) or "none"
        raise SubmitError(f"no job '{name}': {root / 'jobs'} has no {name}.py (jobs there: {have})")
    return f"jobs/{name}.py"


def _ignored(rel: Path, root: Path, excludes: Sequence[str]) -> bool:
    """Conservative: True if an exclude or ignore-file pattern may drop `rel` from the upload."""
    patterns = list(excludes)
    for name in (".gitignore", ".rayignore"):
        if (root / name).is_file():
            patterns += [ln.strip() for ln in (root / name).read_text().splitlines()
                         if ln.strip() and not ln.startswith(("#", "!"))]
    names = [rel.as_posix(), *rel.parts]
    return any(fnmatch.fnmatch(n, p.strip("/")) for p in patterns for n in names)


def place_config(config: str | None, root: Path, excludes: Sequence[str]) -> tuple[str | None, str | None]:
    """-> (the --config argument on the cluster, or None; the YAML to send inline, or None)."""
    if config is None:
        return None, None
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        note(f"warning: config {config} is not a file here; passing the path as is (it must exist on the cluster)")
        return config, None
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = None
    if rel is not None and not _ignored(rel, root, excludes):
        return rel.as_posix(), None
    from omegaconf import OmegaConf

    from iqa_spider.config.loader import read_yaml  # merges `include:`d files, which may not travel

    return None, OmegaConf.to_yaml(read_yaml(path))


def build_entrypoint(script: str, config_arg: str | None, inline_name: str | None,
                     overrides: Sequence[str]) -> str:
    args = "".join(" " + shlex.quote(o) for o in overrides)
    if inline_name is None:
        cfg = f" --config {shlex.quote(config_arg)}" if config_arg else ""
        return f"python {script}{cfg}{args}"
    name = re.sub(r"[^\w.-]", "_", inline_name)
    return (f'd=$(mktemp -d) && printf "%s\\n" "${CONFIG_ENV}" > "$d/{name}" && '
            f'python {script} --config "$d/{name}"{args}; rc=$?; rm -rf "$d"; exit $rc')


def pass_env(names: Sequence[str], defaults: bool = True) -> dict[str, str]:
    """Values from this shell for the variables named (globs allowed: 'AWS_*'); unset ones are skipped."""
    env: dict[str, str] = {}
    for name in (DEFAULT_ENV if defaults else []):
        if name in os.environ:
            env[name] = os.environ[name]
    for name in names:
        if "=" in name:
            raise SubmitError(f"--env takes a variable name, not a value: set {name.split('=')[0]} in your "
                              "environment and pass --env with its name")
        found = {k: v for k, v in os.environ.items() if fnmatch.fnmatchcase(k, name)}
        if not found:
            note(f"warning: --env {name}: not set here, not passed")
        env.update(found)
    return env


def build_submission(name: str, config: str | None = None, overrides: Sequence[str] = (),
                     env: Sequence[str] = (), default_env: bool = True, working_dir: str | None = None,
                     excludes: Sequence[str] = ()) -> tuple[str, dict]:
    """-> (entrypoint, runtime_env) for jobs/NAME.py; nothing is contacted."""
    root = find_root(working_dir)
    script = job_script(root, name)
    all_excludes = EXCLUDES + list(excludes)
    config_arg, inline = place_config(config, root, all_excludes)
    env_vars = pass_env(env, default_env)
    if inline is not None:
        env_vars[CONFIG_ENV] = inline
    runtime_env: dict = {"working_dir": str(root), "excludes": all_excludes, "env_vars": env_vars}
    if (root / "platform" / "iqa_spider").is_dir():
        runtime_env["py_modules"] = [str(root / "platform" / "iqa_spider")]
    entry = build_entrypoint(script, config_arg, Path(config).name if inline is not None else None, overrides)
    return entry, runtime_env


def _auth_headers(address: str | None) -> dict[str, str]:
    """Ray 2.5x clusters from `ray start` use token auth by default, but Ray's HTTP client only sends
    the token when RAY_AUTH_MODE=token. With RAY_AUTH_MODE unset, send RAY_AUTH_TOKEN if set, or the
    local token file (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) to a cluster on this machine only."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}  # explicit: Ray's own handling
    token = os.environ.get("RAY_AUTH_TOKEN")
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    if not token and urlparse(address if "://" in address else f"http://{address}").hostname in LOCAL_HOSTS:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    # address None: RAY_API_SERVER_ADDRESS / RAY_ADDRESS, as `ray job` does
    return JobSubmissionClient(address, headers=_auth_headers(address))


def submit(name: str, config: str | None = None, overrides: Sequence[str] = (), address: str | None = None,
           job_id: str | None = None, **kwargs) -> str:
    """Submit jobs/NAME.py; returns the job (submission) id."""
    entry, runtime_env = build_submission(name, config, overrides, **kwargs)
    job_id = job_id or f"iqa-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    passed = sorted(k for k in runtime_env["env_vars"] if k != CONFIG_ENV)
    how = f"{config} sent inline" if CONFIG_ENV in runtime_env["env_vars"] else "config in the working dir"
    note(f"submitting jobs/{name}.py from {runtime_env['working_dir']} ({how}); "
          f"env vars passed by name: {', '.join(passed) or 'none'}")
    c, deadline = client(address), time.monotonic() + 60
    while True:
        try:
            return c.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=job_id,
                                metadata={"iqa_spider_job": name, "config": str(config)})
        except RuntimeError as exc:  # a cluster just started: its job agent is not up yet
            if "already exists" in str(exc):
                raise SubmitError(f"job id {job_id} is already taken on this cluster; choose another "
                                  "--job-id (or none, for a fresh one)") from None
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(job_id: str, address: str | None = None, timeout: float | None = None, poll: float = 1.0):
    """Poll until the job ends; returns its JobStatus (TimeoutError past `timeout` seconds)."""
    c = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = c.get_job_status(job_id)
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout:.0f}s")
        time.sleep(poll)


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs until it ends; returns the final status value."""
    out = out or sys.stdout
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(job_id, address).value


