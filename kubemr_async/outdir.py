"""The output directory of `kubemr run`: what may be replaced, who may write it, and how.

The rule is that kubemr deletes only what kubemr wrote. An output is replaced only when it
holds a previous kubemr result (a ``_SUCCESS`` manifest plus exactly the parts it lists and
our ``_logs/``); a file, a directory holding anything else, or a path that overlaps the
inputs is refused, ``--overwrite`` or not, because a typo in ``--output`` must not cost the
user their data.

One run writes an output at a time: a lock file beside it (``.<name>.kubemr-lock``) is
created with ``O_CREAT|O_EXCL`` and touched every :data:`LOCK_REFRESH_SECONDS` while the run
lives. A lock is stale (and taken over) when its owner's pid is gone on this host, or, on
any host, when it has not been touched for :data:`LOCK_STALE_SECONDS`.

Every hidden directory a run creates is named ``.<name>.kubemr-<kind>-<12 hex>``, so a run
holding the lock can remove what a SIGKILLed predecessor left, by exact name and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import formats
from .errors import KubemrError, OutputBusy, UsageError
from .formats import SUCCESS_MARKER

LOGS_DIR = "_logs"
#: How often a running `kubemr run` touches its lock file.
LOCK_REFRESH_SECONDS = 5.0
#: A lock untouched for this long belongs to a dead (or frozen) run on some host and is
#: taken over: twelve missed refreshes, so a busy machine never loses a live run's lock.
LOCK_STALE_SECONDS = 60.0
_HIDDEN_KINDS = ("work", "old", "stale")
_LOG_FILE = re.compile(r"worker-\d+\.log")


class OutputChanged(KubemrError):
    """The output was changed by someone else while the job ran; nothing was replaced."""


@dataclass(frozen=True)
class OutputState:
    """What the output held when checked: publishing replaces exactly this, or nothing."""

    exists: bool
    entries: frozenset[str] = frozenset()
    manifest: bytes = b""

    @property
    def is_result(self) -> bool:
        return bool(self.manifest)


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.kubemr-lock")


def hidden_path(output: Path, kind: str) -> Path:
    """A fresh hidden name beside ``output`` that :func:`remove_stale` recognises."""
    assert kind in _HIDDEN_KINDS
    return output.with_name(f".{output.name}.kubemr-{kind}-{secrets.token_hex(6)}")


def _hidden_pattern(output: Path) -> re.Pattern[str]:
    kinds = "|".join(_HIDDEN_KINDS)
    return re.compile(rf"\.{re.escape(output.name)}\.kubemr-(?:{kinds})-[0-9a-f]{{12}}")


def remove_stale(output: Path) -> list[Path]:
    """Remove what an earlier run into ``output`` left behind (call only holding the lock).

    A run killed between moving the previous result aside and renaming its own into place
    leaves no ``output`` and an ``old`` directory: that is the user's earlier result, so it
    is put back first, never deleted.
    """
    pattern = _hidden_pattern(output)
    if not os.path.lexists(output):
        old = re.compile(rf"\.{re.escape(output.name)}\.kubemr-old-[0-9a-f]{{12}}")
        for candidate in sorted(output.parent.iterdir()):
            if old.fullmatch(candidate.name) and candidate.is_dir():
                with contextlib.suppress(UsageError):
                    if inspect_output(candidate, output).is_result:
                        candidate.rename(output)
                        break
    removed = []
    with os.scandir(output.parent) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name):
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path)
    return removed


# --- what the output holds -------------------------------------------------------------


def inspect_output(output: Path, shown: Path | None = None) -> OutputState:
    """The output's state; UsageError if it is anything kubemr may not replace.

    ``shown`` is the name used in messages (the output's, when inspecting a renamed copy).
    """
    name = shown or output
    try:
        mode = output.lstat().st_mode
    except FileNotFoundError:
        return OutputState(False)
    except OSError as exc:  # a file on the way (ENOTDIR), a name too long, ...
        raise UsageError(f"output {name} cannot be a directory: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"output {name} is a file, not a directory; refusing to replace it")
    entries = frozenset(os.listdir(output))
    if not entries:
        return OutputState(True)
    manifest, parts = _read_manifest(output / SUCCESS_MARKER)
    if not manifest:
        raise UsageError(f"output {name} is a non-empty directory without a kubemr "
                         f"{SUCCESS_MARKER} manifest; refusing to write into it "
                         "(choose a new or empty directory)")
    allowed = {SUCCESS_MARKER, LOGS_DIR, *parts}
    for entry in sorted(entries):
        path = output / entry
        if entry not in allowed:
            raise UsageError(f"output {name} holds {entry}, which is not part of the kubemr "
                             f"result its {SUCCESS_MARKER} lists; refusing to replace it")
        if entry == LOGS_DIR:
            _check_logs(path, name)
        elif not stat.S_ISREG(path.lstat().st_mode):
            raise UsageError(f"output {name} holds {entry}, which is not a regular file; "
                             "refusing to replace it")
    return OutputState(True, entries, manifest)


def _read_manifest(path: Path) -> tuple[bytes, list[str]]:
    """The manifest's bytes and part names, or (b"", []) if it is not one of ours.

    Its parts must be plain ``part-*`` names beside it: only then does replacing the
    directory remove exactly what the manifest lists.
    """
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return b"", []
        data = path.read_bytes()
        parts = formats.read_manifest(data).parts
    except (OSError, ValueError):
        return b"", []
    if not all(p.startswith("part-") and "/" not in p for p in parts):
        return b"", []
    return data, list(parts)


def _check_logs(path: Path, name: Path) -> None:
    if not stat.S_ISDIR(path.lstat().st_mode):
        raise UsageError(f"output {name} holds {LOGS_DIR}, which is not a directory; "
                         "refusing to replace it")
    for entry in sorted(os.listdir(path)):
        if not _LOG_FILE.fullmatch(entry) or not stat.S_ISREG((path / entry).lstat().st_mode):
            raise UsageError(f"output {name} holds {LOGS_DIR}/{entry}, which kubemr did not "
                             "write; refusing to replace it")


def check_overlap(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is, contains, or lies inside an input (resolved paths)."""
    for path in sorted(inputs):
        if path == output:
            raise UsageError(f"output {output} is one of the inputs")
        if path in output.parents:
            raise UsageError(f"output {output} lies inside input {path}")
        if output in path.parents:
            raise UsageError(f"output {output} contains input {path}")


def check_output(output: Path, overwrite: bool, inputs: Iterable[Path]) -> OutputState:
    """Every check before a run writes ``output``; UsageError naming the first problem."""
    check_overlap(output, inputs)
    state = inspect_output(output)
    if state.is_result and not overwrite:
        raise UsageError(f"output directory {output} already holds results of an earlier "
                         "kubemr run; pass --overwrite to replace them")
    return state


# --- publishing ----------------------------------------------------------------------


def replace_output(staged: Path, output: Path, expected: OutputState) -> None:
    """Rename ``staged`` to ``output``, replacing exactly what was checked at start.

    The old result is renamed aside first and deleted only once the new one is in place;
    if the output changed meanwhile, nothing is replaced and OutputChanged says why.
    """
    try:
        current = inspect_output(output)
    except UsageError as exc:
        raise OutputChanged(f"{exc} (it changed while the job ran; nothing was replaced)"
                            ) from None
    if current != expected:
        raise OutputChanged(f"output {output} changed while the job ran; nothing was replaced")
    old: Path | None = None
    if current.exists:
        old = hidden_path(output, "old")
        os.rename(output, old)
        try:
            moved = inspect_output(old, shown=output)
        except UsageError:
            moved = None
        if moved != expected:  # something was added between the check and the rename
            with contextlib.suppress(OSError):
                os.rename(old, output)
            raise OutputChanged(f"output {output} changed while publishing; nothing was replaced")
    try:
        os.rename(staged, output)  # fails on anything but a missing or empty directory
    except OSError as exc:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, output)
        raise OutputChanged(f"output {output} appeared while publishing ({exc.strerror}); "
                            "nothing was replaced") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- the lock ------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> tuple[dict[str, Any], os.stat_result] | None:
    """The lock's owner fields and stat, or None if it vanished."""
    try:
        st = path.stat()
        info: Any = orjson.loads(path.read_bytes() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        return {}, path.stat()
    return (info if isinstance(info, dict) else {}), st


def _owner(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def _is_stale(info: dict[str, Any], st: os.stat_result) -> bool:
    if time.time() - st.st_mtime > LOCK_STALE_SECONDS:
        return True
    pid = info.get("pid")
    return (info.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid() and not _pid_alive(pid))


class OutputLock:
    """The right to write one output, held as a lock file beside it (see the module doc)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = lock_path(output)
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> None:
        body = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "token": self.token, "started": time.time()})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = _read_lock(self.path)
                if found is None:
                    continue
                info, st = found
                if not _is_stale(info, st):
                    raise OutputBusy(f"output {self.output} is being written by another "
                                     f"kubemr run ({_owner(info)})") from None
                self._take_over(st)
                continue
            except OSError as exc:
                raise UsageError(f"output {self.output}: cannot create the lock file "
                                 f"{self.path}: {exc.strerror}") from None
            with os.fdopen(fd, "wb") as file:
                file.write(body)
            # A thread, not a task: an --inline run sitting in a debugger blocks the loop.
            self._refresher = threading.Thread(target=self._refresh, name="kubemr-lock",
                                               daemon=True)
            self._refresher.start()
            return
        raise OutputBusy(f"output {self.output}: could not take its lock {self.path}")

    def _take_over(self, judged: os.stat_result) -> None:
        """Move a stale lock aside, then make sure it was the one judged stale."""
        aside = hidden_path(self.output, "stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        found = _read_lock(aside)
        if found is not None and (found[1].st_ino, found[1].st_mtime_ns) == (
                judged.st_ino, judged.st_mtime_ns):
            aside.unlink(missing_ok=True)
            return
        # Not the lock we judged: its owner is alive. Put it back unless another took its place.
        with contextlib.suppress(OSError):
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        raise OutputBusy(f"output {self.output} is being written by another kubemr run "
                         f"({_owner(found[0] if found else {})})")

    def held(self) -> bool:
        found = _read_lock(self.path)
        return found is not None and found[0].get("token") == self.token

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_SECONDS):
            if self.held():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self.held():
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(output: Path) -> Iterator[OutputLock]:
    """Hold ``output``'s lock for the block; released on every way out."""
    lock = OutputLock(output)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def check_page(path: Path, marker: str) -> None:
    """Refuse to write a page (`--timeline`, `kubemr timeline -o`) over anything but a
    page kubemr wrote: one whose first lines hold ``marker``. A missing file is fine, in
    a directory that exists (checked before a run, not found missing after it)."""
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist")
    try:
        with path.open("rb") as existing:
            head = existing.read(256)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a file to write the page to") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    if marker.encode() not in head:
        raise UsageError(f"{path} exists and was not written by kubemr; not overwriting it")


def write_page(path: Path, text: str, marker: str) -> None:
    """Write ``text`` to ``path`` whole (a temporary file renamed into place), after
    :func:`check_page`."""
    check_page(path, marker)
    staged = path.with_name(f".{path.name}.kubemr-{secrets.token_hex(6)}")
    try:
        staged.write_text(text, encoding="utf-8")
        staged.replace(path)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
