"""Scrubbing credentials out of text before it is shown, logged or stored.

Error messages travel far: an S3 or API error becomes a task's error, the job's status,
an Event, a log line and ``kubemr`` output, all of which a tenant (or anyone who may read
the namespace) can see. So every message that leaves the operator or a worker is passed
through :func:`scrub` first. It removes the values the caller knows to be secret (the
keys it just read from a Secret) and anything shaped like a credential whatever its
source: signed-URL query parameters, ``Authorization`` headers and bearer tokens,
``key=value`` pairs whose key names a secret, URL passwords and AWS access key ids. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

#: The environment variables that carry storage credentials (a Secret's keys, a worker's
#: environment): their values are what a process knows to be secret.
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: What a removed value is replaced with.
REDACTED = "***"
#: Known values shorter than this are not replaced: "a" would eat every message.
MIN_SECRET_CHARS = 6

_SHAPES = (
    # Pre-signed URLs and SigV4 query strings.
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"),
    # Authorization headers (SigV4's carries the access key id and the signature), also
    # as a repr of bytes (b'...'), and SigV4's Credential= wherever it appears.
    re.compile(r"(?i)(Authorization[\"']?\s*[:=]\s*b?[\"']?)[^\"'\n]+"),
    re.compile(r"(\bCredential=)[^,\s&\"']+"),
    # S3 error bodies name the access key id and echo the signature.
    re.compile(r"(?i)(<(?:AWSAccessKeyId|SignatureProvided|StringToSign)>)[^<]+"),
    re.compile(r"(?i)(Bearer\s+)[A-Za-z0-9._~+/=-]+"),
    # key=value, key: value and "key": "value" where the key names a secret (not a path
    # that ends in such a word: "/etc/passwd: Permission denied" keeps its reason).
    re.compile(r"(?i)((?<![/\\])(?:aws_)?(?:secret_access_key|secretaccesskey|session_?token|"
               r"password|passwd|client_?secret|private_?key)[\"']?\s*[:=]\s*[\"']?)"
               r"[^\s\"',;&}]+"),
    # A URL's password (scheme://user:password@host), as a database client's error or an
    # input the user typed carries it; the user name is kept.
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/?#@:\"']*:)[^\s/?#@\"']+(?=@)"),
    # AWS access key ids (long-term AKIA, temporary ASIA).
    re.compile(r"()\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the ``secrets`` given (each at least MIN_SECRET_CHARS long) and
    without anything shaped like a credential; each is replaced by ``***``."""
    for value in sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len,
                        reverse=True):
        text = text.replace(value, REDACTED)
    for shape in _SHAPES:
        text = shape.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def own_secrets(environ: Mapping[str, str]) -> list[str]:
    """The credential values in ``environ`` (a process's own environment): what its logs,
    errors and records must never carry, whatever put them into a message."""
    return [environ.get(key, "") for key in CREDENTIAL_KEYS]
