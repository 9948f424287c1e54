"""A real S3-compatible server on loopback, for tests, benchmarks and local runs.

``S3Server`` starts whatever ``hack/ensure-s3-server.sh`` provides: Versity's versitygw
(posix backend, objects stored as plain files in a temp dir) when Go could build it, else
moto's server mode. Both speak S3 over HTTP with path-style addressing and check SigV4
signatures against the fixed test credentials (versitygw strictly; moto accepts any).

Run ``python -m kubemr_async.testing.s3server`` to get one to poke at by hand.
"""

from __future__ import annotations

import atexit
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from kubemr_async.testing import (
    ServerGroup,
    ServerProcesses,
    TestEnvError,
    free_port,
    run_ensure_script,
    wait_for_interrupt,
)


class S3Server(ServerGroup):
    """An S3 server process with its own temp storage; ``start()``/``stop()`` or ``with``.

    Clients should use ``endpoint_url``, ``access_key``, ``secret_key`` and ``region``, and
    path-style addressing (virtual-host style would need DNS for ``<bucket>.127.0.0.1``).
    """

    def __init__(
        self,
        executable: Path | None = None,
        *,
        access_key: str = "kubemr-test-access",
        secret_key: str = "kubemr-test-secret-key",
        region: str = "us-east-1",
    ) -> None:
        """``executable`` defaults to what ``hack/ensure-s3-server.sh`` provides."""
        self._executable = executable
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.endpoint_url = ""
        self.kind = ""
        self._exe: Path | None = None
        super().__init__()

    @property
    def root(self) -> Path:
        """Temp dir holding the server log (``<kind>.log``) and, for versitygw, the data."""
        if self._tmp is None:
            raise TestEnvError("S3Server is not started")
        return self._tmp

    def client_env(self) -> dict[str, str]:
        """The standard AWS environment variables pointing an SDK client at this server.

        botocore reads ``AWS_ENDPOINT_URL`` itself, so processes we spawn (a Pod run by
        FakeKubelet, the CLI) reach this server without extra configuration.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self) -> Self:
        """Start the server and wait until it answers HTTP; raise TestEnvError if not."""
        exe = self._exe = self._executable or Path(run_ensure_script("ensure-s3-server.sh"))
        self._tmp = Path(tempfile.mkdtemp(prefix="kubemr-s3-"))
        self._procs = ServerProcesses(self._tmp)
        atexit.register(self.stop)  # no orphaned server if the test process dies early
        port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        if exe.name == "versitygw":
            self.kind = "versitygw"
            data, iam = self._tmp / "data", self._tmp / "iam"
            data.mkdir()
            iam.mkdir()
            argv = [
                str(exe),
                f"--access={self.access_key}",
                f"--secret={self.secret_key}",
                f"--region={self.region}",
                f"--port=127.0.0.1:{port}",
                # Internal IAM: more accounts than the root one (add_tenant), each checked.
                f"--iam-dir={iam}",
                "--quiet",  # no per-request line on stdout; it would skew throughput runs
                "posix",
                str(data),
            ]
        else:
            self.kind = "moto"
            argv = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
        try:
            self._procs.spawn(self.kind, argv)
            self._procs.wait_ready(self.kind, self._answers_http, timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def add_tenant(self, access_key: str, secret_key: str, bucket: str) -> None:
        """A second account (versitygw's role ``user``) owning a new ``bucket``: it can
        reach only its own buckets, and its signatures are checked like the root's."""
        if self.kind != "versitygw":
            raise TestEnvError(f"tenant accounts need versitygw, not {self.kind}")
        admin = [str(self._exe), "admin", f"--access={self.access_key}",
                 f"--secret={self.secret_key}", f"--endpoint-url={self.endpoint_url}"]
        for command in (["create-user", f"--access={access_key}", f"--secret={secret_key}",
                         "--role=user"],
                        ["create-bucket", f"--bucket={bucket}", f"--owner={access_key}"]):
            done = subprocess.run([*admin, *command], capture_output=True, text=True,
                                  timeout=60, check=False)
            if done.returncode:
                raise TestEnvError(f"versitygw admin {command[0]} failed: "
                                   f"{done.stderr.strip() or done.stdout.strip()}")

    def _answers_http(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error document (e.g. 403 for anonymous) means it is up
        except urllib.error.URLError:
            return False

def main() -> None:
    """Start a server, print how to reach it and keep it up until Ctrl-C/SIGTERM."""
    with S3Server() as server:
        for key, value in server.client_env().items():
            print(f"export {key}={value}", flush=True)
        print(f"# {server.kind} serving from {server.root}", flush=True)
        wait_for_interrupt()


if __name__ == "__main__":
    main()
