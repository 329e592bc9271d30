"""`iqa-spider submit` and `iqa-spider jobs`: Ray job submission from the command line
(docs/jobs.md); the work is in :mod:`iqa_spider.submit`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iqa_spider.config import ConfigError
from iqa_spider.submit import DEFAULT_ENV, USAGE_EXIT, SubmitError, client, follow, note, submit, wait


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                                     "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")


def submit_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iqa-spider submit", description="Submit jobs/NAME.py to a Ray cluster; "
                                "prints the job id (see docs/jobs.md).")
    p.add_argument("name", help="annotate, train, evaluate, score, promote, demo: any jobs/NAME.py")
    p.add_argument("--config", help="YAML config; inside the working dir it travels with it, else inline")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-4")
    _add_address(p)
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this variable's value from this shell (repeatable; globs like 'AWS_*')")
    p.add_argument("--no-default-env", action="store_true", help=f"do not pass {', '.join(DEFAULT_ENV)}")
    p.add_argument("--working-dir", help="repository to upload (default: . if it has jobs/, else this checkout)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="also keep this out of the upload")
    p.add_argument("--job-id", help="submission id (default: iqa-NAME-TIME-RANDOM)")
    p.add_argument("--wait", action="store_true", help="follow the logs (on stderr); exit 0 only if it SUCCEEDED")
    args = p.parse_intermixed_args(argv)
    try:
        job_id = submit(args.name, args.config, args.overrides, args.address, args.job_id, env=args.env,
                        default_env=not args.no_default_env, working_dir=args.working_dir, excludes=args.exclude)
    except SubmitError as exc:
        note(f"submit error: {exc}")
        return USAGE_EXIT
    except ConfigError as exc:  # an inlined config that cannot be read here
        note(str(exc))
        return USAGE_EXIT
    except ConnectionError as exc:  # no cluster at --address
        note(f"submit failed: {exc}")
        return 1
    print(job_id, flush=True)
    if not args.wait:
        note(f"follow it: iqa-spider jobs logs {job_id} --follow [--address URL]")
        return 0
    status = follow(job_id, args.address, out=sys.stderr)
    note(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def jobs_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iqa-spider jobs", description="Follow jobs submitted to a Ray cluster.")
    sub = p.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="print the job's status (and Ray's message)")
    status.add_argument("--wait", action="store_true", help="wait until it ends; exit 0 only if it SUCCEEDED")
    status.add_argument("--timeout", type=float, help="seconds to wait at most")
    logs = sub.add_parser("logs", help="print the job's logs")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = sub.add_parser("stop", help="stop the job")
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    for q in (status, logs, stop):
        q.add_argument("job_id")
        _add_address(q)
    _add_address(sub.add_parser("list", help="list the cluster's jobs"))
    args = p.parse_args(argv)
    try:
        return _jobs(args)
    except (RuntimeError, ConnectionError, TimeoutError) as exc:  # unknown id, no cluster, --timeout
        note(f"jobs {args.action}: {str(exc).strip().splitlines()[0]}")
        return 1


def _jobs(args: argparse.Namespace) -> int:
    c = client(args.address)
    if args.action == "list":
        for job in c.list_jobs():
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    if args.action == "logs":
        if args.follow:
            return 0 if follow(args.job_id, args.address) == "SUCCEEDED" else 1
        print(c.get_job_logs(args.job_id), end="")
        return 0
    if args.action == "stop":
        note(f"stop requested for {args.job_id}" if c.stop_job(args.job_id) else f"{args.job_id} was not running")
        if args.wait:
            print(f"{args.job_id}: {wait(args.job_id, args.address).value}")
        return 0
    value = wait(args.job_id, args.address, args.timeout).value if args.wait else c.get_job_status(args.job_id).value
    info = c.get_job_info(args.job_id)
    print(f"{args.job_id}: {value}")
    if info.message:
        print(info.message)
    return 0 if not args.wait or value == "SUCCEEDED" else 1


__all__ = ["submit_main", "jobs_main"]
