"""The package's public names, pinned; and importing it (as every ``kubemr`` command does)
stays light until a name or a command needs more."""

from __future__ import annotations

import subprocess
import sys

import kubemr_async

PUBLIC = ["CounterError", "Job", "JobFailed", "JobWorker", "KubemrError",
          "PermanentTaskError", "Pipeline", "Shell", "TaskContext", "UsageError",
          "partition_for", "read_results"]
HEAVY = ["numpy", "pyarrow", "kubernetes_asyncio", "aiohttp", "aiobotocore", "botocore",
         "prometheus_client"]


def test_the_public_names_are_exactly_these_and_each_resolves() -> None:
    assert kubemr_async.__all__ == PUBLIC
    for name in PUBLIC:
        value = getattr(kubemr_async, name)
        assert value.__module__.startswith("kubemr_async."), name
        assert name in dir(kubemr_async)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        kubemr_async.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")


def test_importing_the_package_and_the_cli_loads_no_heavy_library() -> None:
    code = ("import sys, kubemr_async, kubemr_async.cli; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert loaded == ""
    code = "import sys; from kubemr_async import Job; print('pyarrow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "True"


def test_help_and_a_usage_error_load_no_heavy_library_nor_rich() -> None:
    """``kubemr --help`` and a mistyped command are the commands people run most often by
    hand; they print plain text, so neither the heavy libraries nor rich get imported."""
    for argv in (["--help"], ["status"]):
        # At exit: a command that succeeds ends with os._exit, after the atexit handlers.
        code = ("import atexit, runpy, sys; sys.argv = ['kubemr', *sys.argv[1:]]\n"
                "atexit.register(lambda: print('loaded=' + ','.join("
                f"m for m in [*{HEAVY!r}, 'rich'] if m in sys.modules), file=sys.stderr))\n"
                "runpy.run_module('kubemr_async.cli', run_name='__main__')")
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True)
        assert "kubemr" in done.stdout + done.stderr, argv  # it printed help or the error
        assert done.stderr.strip().splitlines()[-1] == "loaded=", (argv, done.stderr)


def _loaded(code: str, *argv: str) -> set[str]:
    """Which of HEAVY and pydantic a fresh interpreter has imported when it exits after
    ``code`` (a command that succeeds ends with os._exit, after the atexit handlers)."""
    code = ("import atexit, sys\natexit.register(lambda: print('loaded=' + ','.join("
            f"m for m in [*{HEAVY!r}, 'pydantic'] if m in sys.modules), file=sys.stderr))\n"
            + code)
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loaded="), done.stderr
    return set(filter(None, last.removeprefix("loaded=").split(",")))


def test_submitting_a_job_that_lives_only_in_the_image_loads_only_the_transport() -> None:
    """What `kubemr submit` imports before it POSTs (the manifest, the cluster client):
    aiohttp for the API server, and not the generated client, S3, Prometheus, numpy or
    pyarrow, which only a job module found here whose source names a pipeline (imported
    to fill in its steps), or one asked to batch its inputs, brings."""
    code = ("from kubemr_async import cli, jobs, manifests\n"
            "manifests.build_manifest(manifests.SubmitOptions(image='i', "
            "job='only_in_the_image.job', inputs=['s3://b/in'], output='s3://b/out'))")
    assert _loaded(code) == {"aiohttp"}
    plain = code.replace("only_in_the_image.job", "examples.wordcount")
    assert _loaded(plain) == {"aiohttp"}  # found here, but names no pipeline
    pipeline = code.replace("only_in_the_image.job", "examples.topn_words")
    assert {"numpy", "pyarrow"} <= _loaded(pipeline)  # the module itself needs them
    batched = plain.replace("output='s3://b/out'", "output='s3://b/out', splits_per_task=4")
    assert {"numpy", "pyarrow"} <= _loaded(batched)  # checked for a JobWorker


def test_running_a_command_loads_no_pydantic() -> None:
    """typer 0.29 validates every option with a pydantic TypeAdapter: ~0.2 s of every
    command's start-up (issue 14), hence typer<0.29. `kubemr version` parses no option;
    a usage error of `submit` parses several."""
    run = ("sys.argv = ['kubemr', *sys.argv[1:]]\nimport runpy\n"
           "runpy.run_module('kubemr_async.cli', run_name='__main__')")
    assert _loaded(run, "version") == set()
    assert _loaded(run, "submit", "--workers", "2", "--reducers", "x") == set()
