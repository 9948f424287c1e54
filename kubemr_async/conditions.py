"""A MapReduceJob's ``status.conditions``, derived from its phase (Kubernetes API conventions).

The phase is the protocol's verdict; conditions say the same in the shape generic tools read,
so ``kubectl wait --for=condition=Succeeded mrj/NAME`` works. Each type in
:data:`CONDITION_TYPES` is always present, ``True`` for the phase it names and ``False``
otherwise, with the phase as the reason. The operator writes them (it is their only writer,
so a list replaced whole by a merge patch loses nothing); :func:`job_conditions` keeps a
condition's ``lastTransitionTime`` until its status changes, as the conventions ask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

from .protocol import JobPhase, format_error
from .records import JobError

ConditionStatus = Literal["True", "False", "Unknown"]

#: The condition types, one per phase a user waits for (the CRD schema lists them too).
CONDITION_TYPES: tuple[str, ...] = (JobPhase.RUNNING.value, JobPhase.SUCCEEDED.value,
                                    JobPhase.FAILED.value, JobPhase.CANCELLED.value)


class Condition(TypedDict):
    """One entry of ``status.conditions`` (metav1.Condition's fields)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


def job_conditions(phase: JobPhase, error: JobError | None, generation: int,
                   previous: Sequence[Condition], now: str) -> list[Condition]:
    """The conditions of a job in ``phase``; ``previous`` are the ones on the object now."""
    before = {c.get("type"): c for c in previous}
    conditions: list[Condition] = []
    for kind in CONDITION_TYPES:
        status: ConditionStatus = "True" if phase.value == kind else "False"
        if status == "True" and phase in (JobPhase.FAILED, JobPhase.CANCELLED):
            message = format_error(error)
        elif status == "True":
            message = f"job {phase.value.lower()}"
        else:
            message = ""
        old = before.get(kind)
        since = (old["lastTransitionTime"] if old and old.get("status") == status
                 and old.get("lastTransitionTime") else now)
        conditions.append({"type": kind, "status": status, "reason": phase.value,
                           "message": message[:1024], "lastTransitionTime": since,
                           "observedGeneration": generation})
    return conditions
