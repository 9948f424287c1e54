"""What the platform admin allows a namespace: its Pod Security level and the platform's
own storage credentials.

Both are chosen by namespace labels, which only a cluster admin can set (a tenant with a
Role in its namespace cannot label the namespace itself), matched by label selectors from
the operator's configuration (the chart's ``tenancy`` values). An empty selector matches
no namespace: by default every namespace is ``restricted`` and none may use the platform's
credentials. Selectors are Kubernetes' label selector syntax (``a=b``, ``a!=b``, ``a``,
``!a``, ``a in (x,y)``, ``a notin (x,y)``, joined by commas), parsed once at start-up so a
typo stops the operator with a one-line error instead of quietly matching nothing. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import UsageError
from .config import OperatorConfig
from .podsecurity import Level

Labels = Mapping[str, str]
_Requirement = Callable[[Labels], bool]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_EQUALS = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s+\(([^()]*)\)\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


@dataclass(frozen=True)
class Selector:
    """A parsed label selector; the empty one matches nothing (never everything)."""

    text: str
    requirements: tuple[_Requirement, ...]

    @classmethod
    def parse(cls, text: str, option: str) -> Selector:
        """UsageError naming ``option`` (the flag or chart value) if ``text`` is invalid."""
        return cls(text, tuple(_requirement(part, option) for part in _split(text)))

    def matches(self, labels: Labels) -> bool:
        return bool(self.requirements) and all(r(labels) for r in self.requirements)


def _split(text: str) -> list[str]:
    """The requirements of a selector: commas outside parentheses separate them."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip() or parts:
        parts.append(current)
    return parts


def _requirement(part: str, option: str) -> _Requirement:
    if match := _EQUALS.match(part):
        key, op, value = match.group(1), match.group(3), match.group(4)
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _SET.match(part):
        key, op = match.group(1), match.group(3)
        values = {v.strip() for v in match.group(4).split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EXISTS.match(part):
        negated, key = match.group(1) == "!", match.group(2)
        return lambda labels: (key in labels) != negated
    raise UsageError(f"{option}: invalid label selector requirement {part.strip()!r}")


@dataclass(frozen=True)
class Tenancy:
    """The admin's choices, as parsed selectors."""

    platform_credentials: Selector
    baseline: Selector
    privileged: Selector

    @classmethod
    def of(cls, config: OperatorConfig) -> Tenancy:
        """The configuration's selectors, parsed (UsageError naming a bad one's flag)."""
        return cls(Selector.parse(config.platform_credentials_namespaces,
                                  "--platform-credentials-namespaces"),
                   Selector.parse(config.baseline_namespaces, "--baseline-namespaces"),
                   Selector.parse(config.privileged_namespaces, "--privileged-namespaces"))

    def level(self, labels: Labels) -> Level:
        """The Pod Security level of a namespace with ``labels``: restricted by default."""
        if self.privileged.matches(labels):
            return "privileged"
        if self.baseline.matches(labels):
            return "baseline"
        return "restricted"

    def platform_credentials_allowed(self, labels: Labels) -> bool:
        return self.platform_credentials.matches(labels)
