"""The ``kubemr`` command line (typer). Results and JSON go to stdout; progress and logs to stderr.

Every failure ends as one line, ``kubemr: error: <reason>``, and a non-zero exit code:
1 for a job that failed, 2 for bad usage.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from .errors import JobFailed, KubemrError, UsageError
from .spec import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, parse_size

app = typer.Typer(name="kubemr", no_args_is_help=True, add_completion=True,
                  help="Kubernetes-native, masterless MapReduce for Python.")
T = TypeVar("T")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"kubemr: error: {message}", err=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    """Turn our exceptions into the one-line error contract."""
    try:
        return fn()
    except UsageError as exc:
        _fail(str(exc), 2)
    except JobFailed as exc:
        _fail(str(exc), 1)
    except KubemrError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _positive(name: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)
        return value

    return check


def _size(value: str) -> int:
    try:
        size = parse_size(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint="--chunk-size") from None
    if size <= 0:
        raise typer.BadParameter(f"must be positive, got {value}", param_hint="--chunk-size")
    return size


def _args(values: list[str]) -> dict[str, str]:
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--arg")
        parsed[key] = value
    return parsed


@app.command()
def run(
    job: Annotated[str, typer.Argument(help="Job module: a .py file or package.module[:attr].")],
    input: Annotated[list[str], typer.Option("--input", "-i",
                     help="Input file, directory or glob (repeatable).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the results.")],
    workers: Annotated[int, typer.Option(callback=_positive("--workers"),
                       help="Worker processes.")] = 2,
    reducers: Annotated[int, typer.Option(callback=_positive("--reducers"),
                        help="Reduce partitions (output files).")] = 2,
    chunk_size: Annotated[str, typer.Option(help="Split inputs into chunks of this size.")]
    = "64MiB",
    max_attempts: Annotated[int, typer.Option(callback=_positive("--max-attempts"),
                            help="Attempts per task before the job fails.")]
    = DEFAULT_MAX_ATTEMPTS,
    lease_seconds: Annotated[float, typer.Option(
        help="A task whose worker stops renewing for this long is re-run.")]
    = DEFAULT_LEASE_SECONDS,
    overwrite: Annotated[bool, typer.Option(help="Replace an output directory with results.")]
    = False,
    arg: Annotated[list[str] | None, typer.Option("--arg", help="KEY=VALUE passed to ctx.args.")]
    = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
) -> None:
    """Run a job on this machine with N worker processes; no cluster needed."""
    from .local import run_local

    size = _size(chunk_size)
    if lease_seconds <= 0:
        raise typer.BadParameter(f"must be positive, got {lease_seconds}",
                                 param_hint="--lease-seconds")
    result = _guard(lambda: asyncio.run(run_local(
        job, input, output, workers=workers, reducers=reducers, chunk_size=size,
        max_attempts=max_attempts, lease_seconds=lease_seconds, overwrite=overwrite,
        args=_args(arg or []), progress=progress and sys.stderr.isatty())))
    typer.echo(f"job {result.job} succeeded in {result.seconds:.2f}s: "
               f"{len(result.parts)} result files", err=True)
    typer.echo(str(result.output))


@app.command()
def worker() -> None:
    """Run one worker inside a pod (configured by the environment the operator sets)."""
    import os

    from . import logs
    from .pod import run_pod_worker

    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    raise typer.Exit(_guard(lambda: asyncio.run(run_pod_worker())))


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
        help="Failed worker pods tolerated before a job fails.")] = 4,
    kubeconfig: Annotated[str | None, typer.Option(help="Path to a kubeconfig file.")] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context to use.")] = None,
) -> None:
    """Run the operator: reconcile MapReduceJobs into task records, RBAC and worker Jobs."""
    import os

    from . import logs
    from .kube import api_client
    from .operator import Operator, OperatorConfig

    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    config = OperatorConfig(namespace=namespace, operator_namespace=operator_namespace,
                            s3_secret=s3_secret, s3_endpoint=s3_endpoint, s3_region=s3_region,
                            worker_backoff_limit=worker_backoff_limit)

    async def main() -> None:
        api = await api_client(kubeconfig, context)
        try:
            await Operator(api, config).run()
        finally:
            await api.close()

    _guard(lambda: asyncio.run(main()))


@app.command()
def version() -> None:
    """Print the kubemr-async version."""
    typer.echo(package_version("kubemr-async"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
