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
        code = ("import runpy, sys; sys.argv = ['kubemr', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('kubemr_async.cli', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                f"print('loaded=' + ','.join(m for m in [*{HEAVY!r}, 'rich'] if m in sys.modules),"
                " file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True)
        assert "kubemr" in done.stdout + done.stderr, argv  # it printed help or the error
        assert done.stderr.strip().splitlines()[-1] == "loaded=", (argv, done.stderr)
