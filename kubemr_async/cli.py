"""The ``kubemr`` command line (typer). Results and JSON go to stdout; progress and logs to stderr.

Every failure ends as one line, ``kubemr: error: <reason>``, and a non-zero exit code:
1 for a job that failed, 2 for bad usage.

The cluster commands (submit, status, list, results, logs, cancel, delete, retry) follow
kubectl's conventions for their common flags and only parse and print here; what they do
to the cluster lives in :mod:`kubemr_async.jobs`. Heavy imports (the Kubernetes client,
S3) happen inside the commands, so shell completion and ``kubemr version`` stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from .deaths import STUCK_EXIT_CODE
from .errors import Interrupted, JobFailed, KubemrError, UsageError
from .spec import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_REDUCERS,
    DEFAULT_WORKERS,
    MAX_WORKERS,
    InvalidSpec,
    parse_size,
)

if TYPE_CHECKING:
    from .jobs import JobClient
    from .local import LocalRunResult
    from .records import TaskRecord

# Plain (click) help and plain tracebacks: typer's rich formatting imports rich and
# markdown-it, about 0.15 s of every `kubemr --help` and usage error, for boxes around text.
app = typer.Typer(name="kubemr", no_args_is_help=True, add_completion=True,
                  rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Kubernetes-native, masterless MapReduce for Python.")
T = TypeVar("T")


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


# Options shared by the cluster commands, spelled as kubectl spells them.
Kubeconfig = Annotated[str | None, typer.Option(help="Path to a kubeconfig file.")]
Context = Annotated[str | None, typer.Option(help="Kubeconfig context to use.")]
Namespace = Annotated[str | None, typer.Option(
    "--namespace", "-n",
    help="The job's namespace (default: the kubeconfig context's, else 'default').")]
Output = Annotated[OutputFormat, typer.Option(
    "--output", "-o", help="table, or the raw object(s) as json or yaml.")]
JobName = Annotated[str, typer.Argument(metavar="NAME", help="The MapReduceJob's name.")]


def _fail(message: str, code: int) -> NoReturn:
    """The one error line. Scrubbed like a worker's errors: it may quote what the user
    typed (an input URL with a password in it) or an error carrying this process's keys."""
    from .scrub import own_secrets, scrub

    typer.echo(f"kubemr: error: {scrub(message, own_secrets(os.environ))}", err=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    """Turn our exceptions into the one-line error contract."""
    try:
        return fn()
    except Interrupted as exc:
        _fail(str(exc), 128 + exc.signum)
    except UsageError as exc:
        _fail(str(exc), 2)
    except JobFailed as exc:
        _fail(str(exc), 1)
    except KubemrError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, imported here: ``kubemr --help`` has no event loop to pay for."""
    import asyncio

    return asyncio.run(main)


def _version() -> str:
    from importlib.metadata import version

    return version("kubemr-async")


def _args(values: list[str], flag: str = "--arg") -> dict[str, str]:
    """Parse KEY=VALUE flags; UsageError (a one-line usage error) otherwise."""
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
        parsed[key] = value
    return parsed


def _workers(value: int) -> int:
    if not 0 <= value <= MAX_WORKERS:
        raise typer.BadParameter(f"must be between 0 (runs --inline) and {MAX_WORKERS}, "
                                 f"got {value}", param_hint="--workers")
    return value


_FORMAT_HELP = "Result format: text (key<TAB>value lines), jsonl or parquet."
# Options shared by `kubemr run` and `kubemr submit`: the shell-command steps and skip mode.
Mapper = Annotated[str | None, typer.Option(
    help="Shell command as the map (Hadoop Streaming): the split's lines on stdin, "
         "key<TAB>value lines on stdout.", show_default=False)]
Combiner = Annotated[str | None, typer.Option(
    help="Shell command as the combiner: sorted key<TAB>value lines in and out.",
    show_default=False)]
Reducer = Annotated[str | None, typer.Option(
    help="Shell command as the reducer: key<TAB>value lines sorted by key on stdin; its "
         "stdout is the result part.", show_default=False)]
MaxSkippedRecords = Annotated[int, typer.Option(
    metavar="N",
    help="Skip mode: each task skips up to N bad records (lines/jsonl/csv map inputs: a "
         "call that raises, a JSONL/CSV record that does not parse) or reduce keys (a "
         "Python call that raises), reporting them, instead of failing. 0: off.")]
TaskTimeout = Annotated[float | None, typer.Option(
    metavar="SECONDS", show_default=False,
    help="Fail a task attempt whose work (reads, callbacks or commands, writes) runs longer "
         "than this; it is cancelled (a shell command killed) and retried up to "
         "--max-attempts. Default: no limit.")]
SplitsPerTask = Annotated[int, typer.Option(
    metavar="K",
    help="Batch tiny tasks: each map task maps K consecutive input splits in one attempt, "
         "so the coordination writes are paid once per K splits (many small inputs); a "
         "retry re-maps the whole batch.")]


#: The `kubemr run` flag behind each spec field, for errors the JobSpec raises.
_RUN_FLAGS = {"spec.mapper": "--mapper", "spec.combiner": "--combiner",
              "spec.reducer": "--reducer", "spec.reducers": "--reducers",
              "spec.maxAttempts": "--max-attempts",
              "spec.leaseSeconds": "--lease-seconds", "spec.chunkSize": "--chunk-size",
              "spec.outputFormat": "--format", "spec.inputs": "--input",
              "spec.memory": "--memory", "spec.maxSkippedRecords": "--max-skipped-records",
              "spec.splitsPerTask": "--splits-per-task",
              "spec.taskTimeoutSeconds": "--task-timeout"}


@app.command()
def run(
    job: Annotated[str | None, typer.Argument(
        help="Job module: a .py file or package.module[:attr]. Optional with --mapper (then "
             "a first argument that is not a .py file is an input).",
        show_default=False)] = None,
    inputs: Annotated[list[str] | None, typer.Argument(
        metavar="[INPUT]...", show_default=False,
        help="More inputs, so an unquoted shell glob after --input works.")] = None,
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="Input file, directory or glob (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Directory for the results (new, empty, or an earlier result with "
                         "--overwrite).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(callback=_workers,
                       help="Worker processes (0: --inline).")] = 2,
    reducers: Annotated[int, typer.Option(
                        help="Reduce partitions (output files); 0 runs map-only.")]
    = DEFAULT_REDUCERS,
    chunk_size: Annotated[str, typer.Option(
        help="Split inputs into chunks of this size (at most an eighth of --memory).")]
    = "64MiB",
    max_attempts: Annotated[int, typer.Option(
                            help="Attempts per task before the job fails.")]
    = DEFAULT_MAX_ATTEMPTS,
    lease_seconds: Annotated[float, typer.Option(
        help="A task whose worker stops renewing for this long is re-run.")]
    = DEFAULT_LEASE_SECONDS,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier kubemr result in the output directory (never anything "
             "else).")] = False,
    arg: Annotated[list[str] | None, typer.Option("--arg", help="KEY=VALUE passed to ctx.args.")]
    = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
    inline: Annotated[bool, typer.Option(
        help="Run the whole job in this process, callbacks on the main thread: for "
             "breakpoint() and profilers.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Also show kubemr's own (JSON) logs.")] = False,
    output_format: Annotated[str, typer.Option("--format",
                                               help=_FORMAT_HELP)] = "text",
    memory: Annotated[str | None, typer.Option(
        help="Memory budget per worker (e.g. 256MiB, 1GiB): buffers, merges and fetches "
             "stay within it and spill to local disk beyond it.",
        show_default=False)] = None,
    mapper: Mapper = None,
    combiner: Combiner = None,
    reducer: Reducer = None,
    max_skipped_records: MaxSkippedRecords = 0,
    splits_per_task: SplitsPerTask = 1,
    metrics_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False, min=0, max=65535,
        help="Serve the workers' Prometheus /metrics on 127.0.0.1:PORT while the job runs.")]
    = None,
    timeline: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default=False,
        help="Write the job's timeline (one HTML page: every attempt per worker over time, "
             "by outcome) to FILE when it ends, succeeded or not.")] = None,
    speculative: Annotated[bool, typer.Option(
        help="Backup tasks: an idle worker re-runs a straggling task; the first attempt "
             "to commit wins.")] = True,
    task_timeout: TaskTimeout = None,
) -> None:
    """Run a job on this machine with N worker processes; no cluster needed.

    What callbacks print is shown on stderr as it happens, prefixed with the worker and
    task; each worker's full log is kept under DIR/_logs on success, and under
    $KUBEMR_LOG_DIR (default ~/.local/state/kubemr/runs) on failure.
    """
    from .api import Commands
    from .local import run_local

    commands = Commands(mapper, combiner, reducer)
    if job is not None and mapper is not None and not job.endswith(".py"):
        inputs, job = [job, *(inputs or [])], None  # `--mapper CMD --input data/*.txt`
    if job is None and mapper is None:
        _fail("missing JOB_MODULE (or --mapper CMD for a shell-command job)", 2)
    every_input = [*(input or []), *(inputs or [])]
    if not every_input:
        _fail("missing inputs: give --input PATH (repeatable)", 2)
    if output is None:
        _fail("missing --output DIR", 2)
    async def start() -> LocalRunResult:
        try:
            return await run_local(
                job or "", every_input, output, workers=workers, reducers=reducers,
                chunk_size=parse_size(chunk_size),
                max_attempts=max_attempts, lease_seconds=lease_seconds, overwrite=overwrite,
                args=_args(arg or []), progress=progress and sys.stderr.isatty() and not inline,
                verbose=verbose, inline=inline,
                output_format=output_format,  # type: ignore[arg-type]  # JobSpec checks it
                memory=None if memory is None else _size("--memory", memory),
                commands=commands, max_skipped_records=max_skipped_records,
                splits_per_task=splits_per_task, metrics_port=metrics_port,
                timeline_page=timeline, speculative=speculative,
                task_timeout=task_timeout)
        except InvalidSpec as exc:  # name the flag the user typed, and the spec field
            flag = _RUN_FLAGS.get(exc.field)
            if flag is None:
                raise
            raise UsageError(f"{exc} (the {flag} flag)") from None

    result = _guard(lambda: _run(start()))
    typer.echo(f"job {result.job} succeeded in {result.seconds:.2f}s: "
               f"{len(result.parts)} result files", err=True)
    if result.backups:
        typer.echo(f"backup tasks: {result.backups} launched, {result.backups_won} won",
                   err=True)
    if result.counters:
        from .cli_render import counters_table

        typer.echo(counters_table(result.counters), err=True)
    if result.skipped:
        from .cli_render import skipped_table

        typer.echo(skipped_table(result.skipped), err=True)
    typer.echo(str(result.output))


def _size(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise UsageError(f"{flag}: {exc}") from None


@app.command()
def worker() -> None:
    """Run one worker inside a pod (configured by the environment the operator sets)."""
    from . import logs
    from .pod import run_pod_worker

    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    code = _guard(lambda: _run(run_pod_worker()))
    if code == STUCK_EXIT_CODE:
        from .runtime import exit_stuck

        exit_stuck()
    raise typer.Exit(code)


@app.command()
def operator(
    namespace: Annotated[str | None, typer.Option(
        "--namespace", "-n", help="Watch one namespace (default: all namespaces).")] = None,
    operator_namespace: Annotated[str, typer.Option(
        envvar="KUBEMR_OPERATOR_NAMESPACE", help="Namespace holding the S3 Secret.")]
    = "kubemr-system",
    s3_secret: Annotated[str | None, typer.Option(
        envvar="KUBEMR_S3_SECRET", help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.")]
    = None,
    s3_endpoint: Annotated[str, typer.Option(envvar="KUBEMR_S3_ENDPOINT",
                                             help="S3 endpoint URL for workers.")] = "",
    s3_region: Annotated[str, typer.Option(envvar="AWS_REGION")] = "us-east-1",
    worker_backoff_limit: Annotated[int, typer.Option(
        help="Failed worker pods tolerated per worker before a job fails (kills and "
             "disruptions are not counted).")] = 4,
    metrics_port: Annotated[int, typer.Option(
        envvar="KUBEMR_OPERATOR_METRICS_PORT", metavar="PORT", min=0, max=65535,
        help="Serve /metrics, /healthz and /readyz on this port (0: off).")] = 0,
    worker_metrics_port: Annotated[int, typer.Option(
        envvar="KUBEMR_WORKER_METRICS_PORT", metavar="PORT", min=0, max=65535,
        help="Worker pods serve /metrics on this port, with scrape annotations (0: off).")]
    = 0,
    worker_metrics_linger: Annotated[float, typer.Option(
        metavar="SECONDS",
        help="Worker pods keep /metrics up this long after their job is decided (a last "
             "scrape sees the final counts); cut short when the workers are deleted.")]
    = 30.0,
    leader_elect: Annotated[bool, typer.Option(
        envvar="KUBEMR_LEADER_ELECT",
        help="Reconcile only while holding a Lease (run several replicas, one leads).")]
    = False,
    leader_elect_lease_name: Annotated[str, typer.Option(
        help="The Lease's name (in --operator-namespace, or --leader-elect-namespace).")]
    = "kubemr-operator",
    leader_elect_namespace: Annotated[str | None, typer.Option(
        help="The Lease's namespace (default: --operator-namespace).")] = None,
    leader_elect_identity: Annotated[str | None, typer.Option(
        envvar="POD_NAME", help="Who holds the Lease (default: hostname_random).")] = None,
    leader_elect_lease_duration: Annotated[int, typer.Option(
        metavar="SECONDS", help="A standby takes the Lease once it has seen no renewal "
                                "for this long.")] = 15,
    leader_elect_renew_deadline: Annotated[float, typer.Option(
        metavar="SECONDS", help="The leader stops (exits) when it could not renew the "
                                "Lease for this long.")] = 10.0,
    leader_elect_retry_period: Annotated[float, typer.Option(
        metavar="SECONDS", help="How often the Lease is renewed, or tried.")] = 2.0,
    platform_credentials_namespaces: Annotated[str, typer.Option(
        metavar="SELECTOR",
        help="Namespaces (a label selector) whose jobs may use the platform's S3 "
             "credentials when they name none of their own (default: none).")] = "",
    baseline_namespaces: Annotated[str, typer.Option(
        metavar="SELECTOR",
        help="Namespaces whose worker pods may be Pod Security 'baseline' (default: none; "
             "every other namespace is 'restricted').")] = "",
    privileged_namespaces: Annotated[str, typer.Option(
        metavar="SELECTOR",
        help="Namespaces whose worker pods may be Pod Security 'privileged' (default: "
             "none).")] = "",
    warm_workers: Annotated[int, typer.Option(
        metavar="N", help="Keep N standby workers running, imported and connected, for new "
                          "jobs to adopt (a small job then needs no cold pod start; "
                          "default: none).")] = 0,
    warm_image: Annotated[str, typer.Option(
        metavar="IMAGE", help="The standbys' image; only jobs with exactly this spec.image, "
                              "no template and the platform's credentials adopt one.")] = "",
    pool_namespace: Annotated[str, typer.Option(
        help="The namespace the standbys run in (made if missing; Pod Security "
             "restricted).")] = "kubemr-pool",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Run the operator: reconcile MapReduceJobs into task records, RBAC and worker Jobs.

    SIGTERM stops it cleanly (exit 0): reconciling stops, and a leader releases its Lease.
    """
    from . import logs
    from .kube import Kube
    from .operator import LeaderElection, Operator, OperatorConfig
    from .operator.tenancy import Tenancy
    from .signals import until_signalled

    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))

    def configure() -> OperatorConfig:
        election = None
        if leader_elect:
            election = LeaderElection(
                identity=leader_elect_identity or _default_identity(),
                namespace=leader_elect_namespace or operator_namespace,
                lease_name=leader_elect_lease_name,
                lease_duration=leader_elect_lease_duration,
                renew_deadline=leader_elect_renew_deadline,
                retry_period=leader_elect_retry_period)
        return OperatorConfig(
            namespace=namespace, operator_namespace=operator_namespace, s3_secret=s3_secret,
            s3_endpoint=s3_endpoint, s3_region=s3_region,
            worker_backoff_limit=worker_backoff_limit, metrics_port=metrics_port,
            worker_metrics_port=worker_metrics_port,
            worker_metrics_linger=worker_metrics_linger, leader_election=election,
            platform_credentials_namespaces=platform_credentials_namespaces,
            baseline_namespaces=baseline_namespaces, privileged_namespaces=privileged_namespaces,
            warm_workers=warm_workers, warm_image=warm_image, pool_namespace=pool_namespace)

    config = _guard(configure)

    async def main() -> None:
        Tenancy.of(config)  # a bad selector stops the operator before it connects
        async with await Kube.connect(kubeconfig, context) as kube:
            with contextlib.suppress(Interrupted):  # a clean stop, not an error
                await until_signalled(Operator(kube, config).run())

    _guard(lambda: _run(main()))


def _default_identity() -> str:
    """client-go's usual identity outside a pod: the host and a random part, so two
    operators on one machine never share one."""
    import socket
    import uuid

    return f"{socket.gethostname()}_{uuid.uuid4()}"


# --- the cluster commands ------------------------------------------------------------


def _on_cluster(kubeconfig: str | None, context: str | None, namespace: str | None,
                action: Callable[[JobClient], Awaitable[T]]) -> T:
    """Run ``action`` with a client for the namespace, under the one-line error contract."""
    from .jobs import connect

    async def main() -> T:
        async with connect(kubeconfig, context, namespace) as client:
            return await action(client)

    return _guard(lambda: _run(main()))


async def _wait(client: JobClient, name: str) -> None:
    """Follow a job to its verdict: bars on stderr (on a terminal), JobFailed unless it
    succeeded."""
    from .progress import ProgressBar

    bar = ProgressBar() if sys.stderr.isatty() else None
    try:
        await client.wait(name, bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    typer.echo(f"job {name} succeeded", err=True)


def _print(obj: Any, output: OutputFormat, table: Callable[[Any], str]) -> None:
    if output is OutputFormat.JSON:
        import orjson

        typer.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
    elif output is OutputFormat.YAML:
        import yaml

        typer.echo(yaml.safe_dump(obj, sort_keys=False), nl=False)
    else:
        typer.echo(table(obj))


def _write(data: bytes) -> None:
    """Bytes to stdout at once: streamed results and logs must not wait in a buffer."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _read_manifest(file: str) -> dict[str, Any]:
    from .manifests import load_manifest

    if file == "-":
        return load_manifest(sys.stdin.read(), "stdin")
    try:
        text = Path(file).read_text()
    except FileNotFoundError:
        raise UsageError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: cannot read: {exc}") from None
    return load_manifest(text, file)


#: submit's flags that describe a job, so they cannot be combined with a manifest FILE.
_JOB_FLAGS = ("name", "generate_name", "image", "job", "input", "output", "workers",
              "reducers", "max_attempts", "chunk_size", "lease_seconds", "arg",
              "split_inputs", "output_format", "mapper", "combiner", "reducer",
              "max_skipped_records", "splits_per_task", "credentials_secret", "identity",
              "task_timeout")


@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[str | None, typer.Argument(
        metavar="FILE", show_default=False,
        help="A MapReduceJob manifest (YAML; '-' reads stdin). Or describe the job with the "
             "flags below instead.")] = None,
    name: Annotated[str | None, typer.Option(help="The job's name.")] = None,
    generate_name: Annotated[str | None, typer.Option(
        help="Name prefix the API server completes (default: the job module's name + '-').")]
    = None,
    image: Annotated[str | None, typer.Option(help="Worker container image.")] = None,
    job: Annotated[str | None, typer.Option(
        help="Job module in the image: package.module[:attr] or a .py path.")] = None,
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="Input URL, s3://bucket/key or prefix (repeatable).")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", help="Where results go: s3://bucket/prefix.")] = None,
    workers: Annotated[int, typer.Option(help="Worker pods running in parallel.")]
    = DEFAULT_WORKERS,
    reducers: Annotated[int, typer.Option(help="Reduce partitions (result objects).")]
    = DEFAULT_REDUCERS,
    max_attempts: Annotated[int, typer.Option(help="Attempts per task before the job fails.")]
    = DEFAULT_MAX_ATTEMPTS,
    chunk_size: Annotated[str, typer.Option(
        help="Split inputs into chunks of this size (at most an eighth of spec.memory).")]
    = "64MiB",
    lease_seconds: Annotated[float, typer.Option(
        help="A task whose worker stops renewing for this long is re-run.")]
    = DEFAULT_LEASE_SECONDS,
    arg: Annotated[list[str] | None, typer.Option(
        "--arg", help="KEY=VALUE passed to ctx.args (repeatable).")] = None,
    split_inputs: Annotated[bool, typer.Option(
        help="Cut inputs into line-aligned chunks (key/value jobs), or hand each input "
             "string to one map as is (low-level jobs).")] = True,
    output_format: Annotated[str, typer.Option("--format",
                                               help=_FORMAT_HELP)] = "text",
    wait: Annotated[bool, typer.Option(
        help="Follow progress until the job ends; exit 1 unless it succeeded.")] = False,
    credentials_secret: Annotated[str | None, typer.Option(
        help="The job's S3 credentials: a Secret in its namespace with AWS_ACCESS_KEY_ID "
             "and AWS_SECRET_ACCESS_KEY (spec.storage.credentialsSecret).")] = None,
    identity: Annotated[list[str] | None, typer.Option(
        "--identity", metavar="ANNOTATION=VALUE",
        help="Or workload identity: an annotation for the job's ServiceAccount, e.g. "
             "eks.amazonaws.com/role-arn=arn:aws:iam::123456789012:role/team-a "
             "(repeatable; spec.storage.serviceAccountAnnotations).")] = None,
    mapper: Mapper = None,
    combiner: Combiner = None,
    reducer: Reducer = None,
    max_skipped_records: MaxSkippedRecords = 0,
    splits_per_task: SplitsPerTask = 1,
    task_timeout: TaskTimeout = None,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Create a MapReduceJob from a manifest or from flags; print its name."""
    from .manifests import SubmitOptions, build_manifest, manifest_namespace

    # By name: typer bundles its own click, whose ParameterSource is not click's.
    given = [flag for flag in _JOB_FLAGS
             if getattr(ctx.get_parameter_source(flag), "name", "") == "COMMANDLINE"]

    def manifest() -> dict[str, Any]:
        if file is not None:
            if given:
                raise UsageError(f"give a manifest FILE or job flags, not both "
                                 f"(got --{given[0].replace('_', '-')})")
            return _read_manifest(file)
        if not (image and (job or mapper) and input and output):
            required = {"--image": image, "--job (or --mapper)": job or mapper,
                        "--input": input, "--output": output}
            missing = ", ".join(flag for flag, value in required.items() if not value)
            raise UsageError(f"missing {missing} (or give a manifest FILE)")
        return build_manifest(SubmitOptions(
            image=image, job=job or "", inputs=input, output=output, name=name,
            mapper=mapper, combiner=combiner, reducer=reducer,
            generate_name=generate_name, workers=workers, reducers=reducers,
            max_attempts=max_attempts, args=_args(arg or []), split_inputs=split_inputs,
            chunk_size=parse_size(chunk_size), lease_seconds=lease_seconds,
            output_format=output_format,  # type: ignore[arg-type]  # JobSpec checks it
            max_skipped_records=max_skipped_records, splits_per_task=splits_per_task,
            task_timeout=task_timeout, credentials_secret=credentials_secret,
            identity=_args(identity, "--identity") if identity else None))

    body = _guard(manifest)
    target = _guard(lambda: manifest_namespace(body, namespace))

    async def action(client: JobClient) -> None:
        created = await client.create(body)
        job_name = str(created["metadata"]["name"])
        typer.echo(job_name)
        if wait:
            await _wait(client, job_name)

    _on_cluster(kubeconfig, context, target, action)


@app.command()
def status(
    name: JobName,
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="Show live progress until the job ends, then its status; "
                              "exit 1 unless it succeeded.")] = False,
    output: Output = OutputFormat.TABLE,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Show a job's phase, progress (rates, ETA), running tasks, failures, error, results
    and counters."""
    from .cli_render import describe
    from .kube import Forbidden

    async def action(client: JobClient) -> None:
        failure: JobFailed | None = None
        if watch:
            try:
                await _wait(client, name)
            except JobFailed as exc:
                failure = exc
        obj = await client.get(name)
        tasks: Sequence[TaskRecord] = ()
        if output is OutputFormat.TABLE:
            try:
                tasks = await client.tasks(name)
            except Forbidden:
                # A tenant whose Role covers MapReduceJobs only: the job's own status
                # still tells its progress, error and results.
                typer.echo("kubemr: note: not allowed to read this job's task records; "
                           "showing the job's own status", err=True)
        _print(obj, output, lambda job: describe(job, tasks))
        if failure is not None:
            raise failure

    _on_cluster(kubeconfig, context, namespace, action)


@app.command("timeline")
def timeline_page(
    name: JobName,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="Where to write the page (a new file, or a timeline kubemr wrote before).")],
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Write the job's timeline to FILE: one self-contained HTML page, a Gantt chart of
    every attempt per worker over time, coloured by outcome, with the stages and the
    slowest tasks called out."""
    import time

    from . import protocol, timeline
    from .outdir import check_page, write_page

    _guard(lambda: check_page(output, timeline.MARKER))

    async def action(client: JobClient) -> None:
        obj, tasks = await client.timeline(name)
        phase = str((obj.get("status") or {}).get("phase") or protocol.JobPhase.PENDING.value)
        page = timeline.render(name, tasks, protocol.millis(time.time()), phase)
        write_page(output, page, timeline.MARKER)
        typer.echo(str(output))

    _on_cluster(kubeconfig, context, namespace, action)


@app.command("list")
def list_jobs(
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="List the jobs of every namespace.")] = False,
    selector: Annotated[str | None, typer.Option(
        "--selector", "-l",
        help="Only jobs whose labels match this selector, as kubectl's -l "
             "(team=a, team!=b, 'tier in (x,y)', comma-separated).")] = None,
    output: Output = OutputFormat.TABLE,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """List jobs: NAME PHASE MAPS REDUCES AGE (maps and reduces as done/total)."""
    from .cli_render import list_table

    async def action(client: JobClient) -> None:
        listing = await client.list(all_namespaces, selector)
        if output is OutputFormat.TABLE and not listing["items"]:
            where = "" if all_namespaces else f" in {client.namespace} namespace"
            typer.echo(f"No resources found{where}.", err=True)
            return
        _print(listing, output, lambda obj: list_table(obj["items"], all_namespaces))

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def results(
    name: JobName,
    cat: Annotated[bool, typer.Option(
        help="Print the result objects' contents in partition order, each as soon as its "
             "reduce commits (while the job still runs); parquet parts as JSON lines.")]
    = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Print a succeeded job's results, one per line in partition order.

    --cat reads s3:// results with the standard AWS_* variables (and KUBEMR_S3_ENDPOINT);
    if the job fails, it exits 1 after printing the partitions that were complete.
    """
    from .jobs import ResultReader, published_results

    async def action(client: JobClient) -> None:
        if not cat:
            for result in published_results(name, await client.get(name)):
                typer.echo(result)
            return
        reader = ResultReader()
        fmt = (await client.get(name)).get("spec", {}).get("outputFormat", "text")
        try:
            async with contextlib.aclosing(client.results(name)) as parts:
                async for partition, url in parts:
                    await reader.copy(name, partition, url, _write, fmt)
        finally:
            await reader.aclose()

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def logs(
    name: JobName,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep streaming until every worker pod ends.")] = False,
    tail: Annotated[int, typer.Option(help="Recent lines to show per pod; -1 shows all.")]
    = -1,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Print the logs of a job's worker pods, each line prefixed with its pod (kubectl's
    --prefix format)."""

    if tail < -1:
        _fail(f"--tail must be -1 (all lines) or more, got {tail}", 2)

    def note(text: str) -> None:
        typer.echo(f"kubemr: note: {text}", err=True)

    async def action(client: JobClient) -> None:
        async with contextlib.aclosing(client.logs(name, follow, None if tail < 0 else tail,
                                                   note)) as lines:
            async for pod, container, line in lines:
                _write(f"[pod/{pod}/{container}] ".encode() + line
                       + (b"" if line.endswith(b"\n") else b"\n"))

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def cancel(name: JobName, namespace: Namespace = None, kubeconfig: Kubeconfig = None,
           context: Context = None) -> None:
    """Stop a pending or running job: it becomes Cancelled and the operator stops its workers."""

    async def action(client: JobClient) -> None:
        typer.echo(f"job {name} {await client.cancel(name)}", err=True)

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def delete(
    name: JobName,
    wait: Annotated[bool, typer.Option(help="Return once the job is gone.")] = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Delete a job with its workers, task records and results list (result objects stay)."""

    async def action(client: JobClient) -> None:
        await client.delete(name, wait)
        typer.echo(f"job {name} deleted", err=True)

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def retry(
    name: JobName,
    wait: Annotated[bool, typer.Option(
        help="Follow progress until the job ends; exit 1 unless it succeeded.")] = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Re-run a Failed or Cancelled job: committed tasks are kept, the rest run again."""

    async def action(client: JobClient) -> None:
        await client.retry(name)
        typer.echo(f"job {name} retried", err=True)
        if wait:
            await _wait(client, name)

    _on_cluster(kubeconfig, context, namespace, action)


@app.command()
def version() -> None:
    """Print the kubemr-async version."""
    typer.echo(_version())


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version())
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print the kubemr-async version and exit.")] = False,
) -> None:
    """Kubernetes-native, masterless MapReduce for Python."""


def main() -> None:
    """The console script: typer/click's own usage errors (unknown option, missing
    argument, a value of the wrong type) also end as one line and exit 2."""
    # typer.BadParameter's base is the (vendored) click UsageError: every parse error.
    usage_error: type[Exception] = typer.BadParameter.__mro__[1]
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        formatter = getattr(exc, "format_message", None)
        message = str(formatter()) if formatter else str(exc)
        if message:  # empty when help was shown for a bare `kubemr`
            context = getattr(exc, "ctx", None)
            hint = f" (see {context.command_path} --help)" if context else ""
            typer.echo(f"kubemr: error: {message}{hint}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("kubemr: error: interrupted", err=True)
        sys.exit(130)
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> NoReturn:
    """End the process as soon as its output is out.

    The interpreter's own shutdown tears down every module (pyarrow, numpy, aiohttp...):
    ~0.35 s that a user of `submit --wait` waits for and nothing needs, since every command
    closes what it opened before returning. What the normal exit would still do runs here:
    the atexit handlers (logging's flush, temporary directories' cleanup), then the
    flushes. A non-daemon thread still at work, or output that cannot be flushed (a closed
    pipe), gets the normal exit instead, which waits for the one and reports the other.
    """
    if any(thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
           for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
