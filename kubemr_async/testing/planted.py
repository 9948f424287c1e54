"""Planted credentials, and the search for them in what a test run produced.

docs/security.md promises that no credential appears in a log, an Event, a status or
`kubemr` output. A promise like that is only tested by looking: the test environment's
credentials (the S3 server's keys, any key a test gives a tenant) are random, recognisable
values made for the session and registered here, and tests/leaks.py searches every output
of the suite for them. The search looks for each value as it is and in the forms a leak
takes without anyone printing it on purpose: base64 (a Secret's ``data``, a basic-auth
header, a value inside a larger encoded blob, at any of the three alignments), standard
and URL-safe.

A hit names what was found (``the S3 server's secret key (base64)``), never the value, so
the report of a leak does not leak it again.

Nothing here knows pytest; reading the files it is given is its only I/O, so a unit test
can show that it flags a planted value written by another process.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Shorter values would be found by chance in unrelated text.
MIN_LENGTH = 12


@dataclass(frozen=True)
class Needle:
    """One form of one planted value: ``label`` says which, ``data`` is what is searched."""

    label: str
    data: bytes


def base64_forms(value: bytes) -> set[bytes]:
    """The base64 text that every encoding containing ``value`` shares, whatever bytes come
    before it: for each alignment (0, 1 or 2 bytes before), the characters that depend on
    ``value`` alone, standard and URL-safe alphabets."""
    forms = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + value)
        # Character k holds bits [6k, 6k+6); the value's bits are [8*shift, 8*(shift+len)).
        start = -(-8 * shift // 6)
        end = 8 * (shift + len(value)) // 6
        core = encoded[start:end]
        forms.add(core)
        forms.add(core.translate(bytes.maketrans(b"+/", b"-_")))
    return forms


class Planted:
    """The planted values of a session and every form in which they are searched."""

    def __init__(self) -> None:
        self._needles: list[Needle] = []
        self._values: dict[str, str] = {}

    def plant(self, label: str, kind: str) -> str:
        """A new random value that reads as what it is (``planted-secret-<hex>``),
        registered under ``label``."""
        value = f"planted-{kind}-{secrets.token_hex(8)}"
        self.add(label, value)
        return value

    def add(self, label: str, value: str) -> None:
        """Search for ``value`` (made elsewhere, a tenant's key say) from now on."""
        if len(value) < MIN_LENGTH:
            raise ValueError(f"planted value for {label} is shorter than {MIN_LENGTH} "
                             "characters: a search for it would find it by chance")
        if value in self._values.values():
            return
        self._values[label] = value
        raw = value.encode()
        self._needles.append(Needle(label, raw))
        self._needles += [Needle(f"{label} (base64)", form) for form in base64_forms(raw)]

    @property
    def labels(self) -> list[str]:
        return list(self._values)

    def find(self, text: str | bytes) -> str | None:
        """The label of the first planted value found in ``text`` (any form), or None."""
        data = text.encode(errors="replace") if isinstance(text, str) else text
        for needle in self._needles:
            if needle.data in data:
                return needle.label
        return None

    def redact(self, text: str) -> str:
        """``text`` with every planted value (any form) replaced by ``<label>``."""
        for needle in sorted(self._needles, key=lambda n: -len(n.data)):
            text = text.replace(needle.data.decode(), f"<{needle.label}>")
        return text

    def find_in_files(self, paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
        """(path, label) for each file holding a planted value; a file that vanished
        while the search ran (a test's cleanup) holds nothing any more."""
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            label = self.find(data)
            if label is not None:
                yield path, label


class GrowingFile:
    """A file that is only appended to (an API server's audit log): each call reads the
    whole lines written since the last, so searching it after every test costs only what
    that test wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_lines(self) -> list[bytes]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return data[:end].splitlines()


def audit_leaks(planted: Planted, lines: Iterable[bytes]) -> list[str]:
    """Where each audit event holding a planted value wrote it (``patch
    mapreducejobs/status ns/name by user: <label>``); the search runs on the raw line, and
    only a hit is parsed."""
    found = []
    for line in lines:
        label = planted.find(line)
        if label is None:
            continue
        try:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            resource = "/".join(filter(None, (ref.get("resource"), ref.get("subresource"))))
            name = "/".join(filter(None, (ref.get("namespace"), ref.get("name"))))
            where = (f"{event.get('verb')} {resource} {name or event.get('requestURI')} by "
                     f"{(event.get('user') or {}).get('username')}")
        except (ValueError, AttributeError):
            where = "an unreadable audit event"
        found.append(f"{where}: {label}")
    return found


#: Resources whose writes the API server's audit log records (at level Request: the body
#: written), for the search: everything a job's status, Events, pods and tasks are made of.
AUDITED = {
    "": ["pods", "pods/status", "configmaps", "events", "serviceaccounts"],
    "events.k8s.io": ["events"],
    "batch": ["jobs", "jobs/status"],
    "kubemr.io": ["mapreducejobs", "mapreducejobs/status", "mapreducetasks",
                  "mapreducetasks/status"],
}


def audit_policy() -> str:
    """kube-apiserver's audit policy (JSON is YAML) recording the request body of every
    create, update and patch of :data:`AUDITED`, and nothing else."""
    return json.dumps({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "Request", "verbs": ["create", "update", "patch"],
             "resources": [{"group": group, "resources": resources}
                           for group, resources in AUDITED.items()]},
            {"level": "None"},
        ]})

