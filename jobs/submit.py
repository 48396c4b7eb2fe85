"""``shardsmith submit -- JOB ARGS...``: run a shardsmith job on a Ray cluster through Ray's job API.

The job is the same plain module that runs on a laptop (``python -m shardsmith.jobs.JOB ARGS``). The project
folder is packaged as its working directory (weights, data and outputs excluded). Before submitting,
a preflight job asks the cluster for its Python and installed packages and compares them with
requirements.lock: all there at the pinned versions -> no pip in the runtime env; some missing or
different -> pip installs exactly those pins; another Python than the project supports, or another
torch / CUDA build -> refused (exit 2, one line). ``--pip`` / ``--no-pip`` force either way. The
entrypoint reserves the resources you give. The command then streams the job's logs and exits with
its status: 0 succeeded, the job's own exit code (or 1) failed (1 too when it failed setting up its
runtime env, said as such), 3 stopped, 124 timed out (the job is stopped), 130 interrupted (the job
keeps running).

    shardsmith submit --address http://127.0.0.1:8265 -- curate s3://bkt/laion s3://bkt/curated ...
    python -m shardsmith.jobs.submit -- curate IN OUT ...                    (the same)
    ray job submit --working-dir . -- python -m shardsmith.jobs.curate IN OUT ...   (Ray's own CLI, same job)

The job API (port 8265 on the head) is never exposed publicly: open a tunnel first
(`ray dashboard cluster/ray-up/aws.yaml`, or `kubectl port-forward svc/HEAD-SVC 8265:8265`). With
Ray token authentication (on by default), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from shardsmith.jobs.entry import job_main


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray job API URL, e.g. http://127.0.0.1:8265 (the tunnel end; default: "
                                     "RAY_API_SERVER_ADDRESS or RAY_ADDRESS if an http URL, else http://127.0.0.1:8265)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_address(p)
    p.add_argument("--runtime-env", metavar="FILE", help="YAML/JSON runtime env merged over the default one "
                                                         "(its keys win; excludes and env_vars are added)")
    p.add_argument("--working-dir", metavar="DIR", help="folder to package as the job's working directory "
                                                       "(default: this project)")
    pip = p.add_mutually_exclusive_group()
    pip.add_argument("--no-pip", dest="pip", action="store_const", const="none",
                     help="no pip in the runtime env, without asking the cluster (its image has the packages)")
    pip.add_argument("--pip", dest="pip", action="store_const", const="pip",
                     help="pip installs every pinned runtime requirement of requirements.lock, without asking the "
                          "cluster (default: ask it, install only what it lacks)")
    p.add_argument("--requirements-lock", metavar="FILE",
                   help="the pins to compare the cluster with (default: this project's requirements.lock)")
    p.add_argument("--preflight-timeout", type=float, default=180, metavar="SECONDS",
                   help="how long the preflight job may take (default 180)")
    p.add_argument("--dry-run", action="store_true",
                   help="ask the cluster, print the decision, the runtime env and the entrypoint; submit nothing")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="environment variable for the job (NAME alone copies it from this shell), e.g. "
                        "AWS_ENDPOINT_URL_S3=http://minio:9000; credentials are refused (give them to the nodes)")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the job's driver")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N", help="GPUs reserved for the job's driver")
    p.add_argument("--entrypoint-memory", type=int, metavar="BYTES", help="memory reserved for the job's driver")
    p.add_argument("--entrypoint-resources", metavar="JSON", help="custom resources for the driver, e.g. '{\"head\": 1}'")
    p.add_argument("--submission-id", help="id for the job (default: shardsmith-JOB-DATE-RANDOM)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop the job and exit 124 if it has not ended after SECONDS (default: wait)")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- JOB ARGS",
                   help="the job and its arguments, e.g. -- curate INPUT OUTPUT --preset none")


def _split_job(words: list[str]) -> tuple[str, list[str]]:
    from shardsmith.cluster.submit import SubmitError

    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise SubmitError("no job given: shardsmith submit [options] -- JOB ARGS (e.g. -- curate IN OUT)")
    return words[0], words[1:]


def run(args: argparse.Namespace) -> int:
    from shardsmith.cluster import submit as cs

    def log(msg: str) -> None:
        print(f"[shardsmith] {msg}", file=sys.stderr, flush=True)

    try:
        name, job_args = _split_job(args.job)
        user_env = cs.load_runtime_env_file(args.runtime_env) if args.runtime_env else {}
        working_dir = Path(args.working_dir).resolve() if args.working_dir else cs.PROJECT_ROOT
        if "working_dir" not in user_env:
            cs.check_job_exists(working_dir, name)
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
        env_vars = cs.parse_env_args(args.env)
        cs.build_runtime_env(working_dir, pip=False, env_vars=env_vars, user=user_env)  # refuse secrets first
        client = cs.connect(args.address)
        log(f"job API {cs.redact(client.get_address())}")
        cs.check_versions(client, log)
        asks = args.pip is None and not any(k in user_env for k in cs.PACKAGE_KEYS)
        if asks:
            log("asking the cluster what it has (a preflight job: Python and installed packages)")
        t0 = time.monotonic()
        decision = cs.decide_packages(client, force=args.pip, user_env=user_env, root=cs.PROJECT_ROOT,
                                      lock=args.requirements_lock, timeout=args.preflight_timeout)
        log(decision.describe() + (f" (asked in {time.monotonic() - t0:.1f} s)" if asks else ""))
        for note in decision.notes:
            log(f"note: {note}")
        runtime_env = cs.build_runtime_env(working_dir, pip=decision.pins, env_vars=env_vars, user=user_env)
        sub = cs.Submission(name, job_args, runtime_env, args.entrypoint_num_cpus, args.entrypoint_num_gpus,
                            args.entrypoint_memory, resources, args.submission_id, metadata=decision.record())
        log(f"runtime env: {cs.describe_runtime_env(runtime_env)}")
        log(f"entrypoint: {sub.entrypoint}")
        if args.dry_run:
            print(json.dumps({"decision": decision.record(), "runtime_env": {k: v for k, v in runtime_env.items()
                                                                           if k != "env_vars"},
                              "env_vars": sorted(runtime_env["env_vars"]), "entrypoint": sub.entrypoint}, indent=1))
            log("--dry-run: nothing submitted")
            return 0
        job_id = cs.submit(client, sub)
    except json.JSONDecodeError as e:
        print(f"shardsmith submit: error: --entrypoint-resources: not JSON: {e}", file=sys.stderr)
        return cs.EXIT_USAGE
    except cs.SubmitError as e:
        print(f"shardsmith submit: error: {e}", file=sys.stderr)
        return cs.EXIT_USAGE
    log(f"submitted {job_id}")
    print(job_id, flush=True)
    if args.no_wait:
        log(f"follow it with: shardsmith jobs logs --follow {job_id}")
        return 0
    return _wait(cs, client, job_id, args.timeout, log)


def _wait(cs, client, job_id: str, timeout: float | None, log) -> int:
    try:
        status = cs.follow(client, job_id, sys.stdout, timeout=timeout)
    except TimeoutError as e:
        log(f"{e}; stopping it")
        try:
            client.stop_job(job_id)
        except Exception as stop_error:  # already ended, or the cluster went away
            log(f"stop failed: {stop_error}")
        return cs.EXIT_TIMEOUT
    except KeyboardInterrupt:
        log(f"interrupted; the job keeps running. Follow: shardsmith jobs logs --follow {job_id}  "
            f"Stop: shardsmith jobs stop {job_id}")
        return cs.EXIT_INTERRUPTED
    except (RuntimeError, OSError) as e:  # the job API went away (tunnel closed, head restarted)
        log(f"lost contact with the job API ({type(e).__name__}: {str(e)[:300]}); the job may still be running: "
            f"shardsmith jobs status {job_id}")
        return cs.EXIT_FAILED
    info = client.get_job_info(job_id)
    code = cs.exit_code(info)
    if status == "FAILED" and cs.is_runtime_env_failure(info):
        from shardsmith.cluster.preflight import runtime_env_error_line

        log(f"job {job_id} FAILED setting up its runtime env, before the job ran: "
            f"{runtime_env_error_line(info.message or '')} (exit code {code})")
        return code
    # Ray's message for a failed job ends with the last 20,000 characters of its logs, which were
    # just streamed: keep its first line.
    message = (info.message or "").strip().splitlines()[0][:300] if status != "SUCCEEDED" and info.message else ""
    log(f"job {job_id} {status}" + (f": {message}" if message else "") + (f" (exit code {code})" if code else ""))
    return code


# ---------------------------------------------------------------------------------------------
# shardsmith jobs list|status|logs|stop
# ---------------------------------------------------------------------------------------------

def add_jobs_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="jobs_action", metavar="ACTION", required=True)
    sp = sub.add_parser("list", help="jobs submitted to the cluster, newest first")
    _add_address(sp)
    for action, help_text in (("status", "a job's status and details (JSON)"), ("logs", "a job's logs"),
                              ("stop", "ask a running job to stop")):
        sp = sub.add_parser(action, help=help_text)
        _add_address(sp)
        sp.add_argument("job_id", metavar="JOB_ID", help="submission id (printed by shardsmith submit)")
        if action == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        if action == "stop":
            sp.add_argument("--wait", action="store_true", help="wait until the job has stopped")
            sp.add_argument("--wait-timeout", type=float, default=120, metavar="SECONDS",
                            help="give up waiting after SECONDS (default 120)")


def run_jobs(args: argparse.Namespace) -> int:
    from shardsmith.cluster import submit as cs

    try:
        client = cs.connect(args.address)
        if args.jobs_action == "list":
            print(cs.job_table(client.list_jobs()))
            return 0
        info = client.get_job_info(args.job_id)
        if args.jobs_action == "status":
            print(cs.job_summary(info))
            return cs.exit_code(info) if str(info.status.value) in cs.TERMINAL else 0
        if args.jobs_action == "logs":
            if args.follow:
                cs.follow(client, args.job_id, sys.stdout)
            else:
                sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running (' + str(info.status.value) + ')'}")
        if args.wait and stopped:
            status = cs.follow(client, args.job_id, io.StringIO(), timeout=args.wait_timeout)
            print(f"{args.job_id}: {status}")
        return 0
    except cs.SubmitError as e:
        print(f"shardsmith jobs: error: {e}", file=sys.stderr)
        return cs.EXIT_USAGE
    except KeyboardInterrupt:
        return cs.EXIT_INTERRUPTED
    except TimeoutError as e:
        print(f"shardsmith jobs: {e}", file=sys.stderr)
        return cs.EXIT_TIMEOUT
    except (RuntimeError, OSError) as e:  # the SDK's "job does not exist", refused tokens, connection errors
        if cs.is_auth_error(e) or isinstance(e, OSError):
            print(f"shardsmith jobs: error: {cs.explain_connect_error(cs.resolve_address(args.address), e)}",
                  file=sys.stderr)
        else:
            print(f"shardsmith jobs: error: {(str(e).strip().splitlines() or [''])[0][:300]}", file=sys.stderr)
        return cs.EXIT_USAGE


JOBS_DOC = """``shardsmith jobs list|status|logs|stop JOB_ID``: the jobs on a Ray cluster, through Ray's job API.

Same address and authentication as ``shardsmith submit`` (--address, RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH). ``status`` exits like ``submit`` for a job that has ended.
"""


class jobs_command:  # noqa: N801  (used like a module by jobs/cli.py's COMMANDS)
    __doc__ = JOBS_DOC

    add_arguments = staticmethod(add_jobs_arguments)
    run = staticmethod(run_jobs)


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.submit", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
