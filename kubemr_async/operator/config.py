"""How the operator is set up: what it watches, how workers reach storage, how it paces."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError

#: client-go's JitterFactor: a candidate waits ``retry_period * (1 + up to 1.2)`` between
#: tries, so the renew deadline must leave room for at least one whole jittered wait.
JITTER = 1.2


@dataclass(frozen=True)
class LeaderElection:
    """Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's three times.

    A standby takes the lease once it has seen no change to it for ``lease_duration``
    seconds (on its own monotonic clock); the leader renews it every ``retry_period`` and
    stops leading (the operator exits) when a renewal has not succeeded within
    ``renew_deadline``, which is shorter than the lease so it stops before anyone may take
    over. ``identity`` is who holds it: the pod's name in a cluster.
    """

    identity: str
    namespace: str = "kubemr-system"
    lease_name: str = "kubemr-operator"
    lease_duration: int = 15  # whole seconds: the Lease stores leaseDurationSeconds
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        """client-go's checks (NewLeaderElector), as one-line usage errors."""
        if not self.identity:
            raise UsageError("leader election: the identity (POD_NAME) is empty")
        if min(self.lease_duration, self.renew_deadline, self.retry_period) <= 0:
            raise UsageError("leader election: lease duration, renew deadline and retry "
                             "period must be greater than zero")
        if self.lease_duration <= self.renew_deadline:
            raise UsageError(f"leader election: the lease duration ({self.lease_duration}s) "
                             f"must be greater than the renew deadline "
                             f"({self.renew_deadline}s)")
        if self.renew_deadline <= JITTER * self.retry_period:
            raise UsageError(f"leader election: the renew deadline ({self.renew_deadline}s) "
                             f"must be greater than {JITTER} x the retry period "
                             f"({self.retry_period}s)")


@dataclass
class OperatorConfig:
    """How workers reach storage and what the platform allows tenants; credentials come
    from a Secret (the tenant's or, where allowed, the platform's), never from a job spec."""

    namespace: str | None = None  # None: every namespace
    operator_namespace: str = "kubemr-system"
    s3_secret: str | None = None  # Secret (in operator_namespace) with AWS_* keys
    #: Label selectors on namespaces (see .tenancy; empty: none): where a job without
    #: spec.storage may use the platform's credentials (s3_secret and the operator's own),
    #: and where worker pods may be baseline or privileged instead of restricted.
    platform_credentials_namespaces: str = ""
    baseline_namespaces: str = ""
    privileged_namespaces: str = ""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    worker_command: list[str] = field(default_factory=lambda: ["kubemr", "worker"])
    # Failed worker pods tolerated per worker before the job fails (workers crash, they do
    # not err); kills and disruptions are not counted (resources.POD_FAILURE_POLICY).
    worker_backoff_limit: int = 4
    image_pull_policy: str = "IfNotPresent"
    #: Reconciles that run at once (each on a different job): planning a big job takes a
    #: while, and must not hold up every other job.
    reconcile_workers: int = 4
    #: How often every job is reconciled whatever the watch said (a missed event heals).
    resync_seconds: float = 30.0
    #: The port of the operator's /metrics, /healthz and /readyz (0: none served).
    metrics_port: int = 0
    #: The port each worker pod serves /metrics on, announced by the usual scrape
    #: annotations (0: workers serve none).
    worker_metrics_port: int = 0
    #: Seconds a worker pod keeps serving /metrics after its job is decided, so a last
    #: scrape sees its final counts (cut short when the operator deletes the workers).
    worker_metrics_linger: float = 30.0
    #: /readyz fails once the jobs' watch has delivered nothing (no list, event or
    #: bookmark) for this long; the API server sends a bookmark about every minute.
    watch_ready_seconds: float = 180.0
    #: The warm pool (.pool): this many standby workers kept running, imported and
    #: connected, in ``pool_namespace``, each adopted by one new job that would run
    #: exactly its pod (image ``warm_image``, no template, the platform's credentials).
    #: 0: none; every job's workers start cold.
    warm_workers: int = 0
    warm_image: str = ""
    pool_namespace: str = "kubemr-pool"
    #: Leader election (None: this operator reconciles at once, alone).
    leader_election: LeaderElection | None = None

    def __post_init__(self) -> None:
        if self.warm_workers < 0:
            raise UsageError(f"--warm-workers must be 0 or more, not {self.warm_workers}")
        if self.warm_workers and not self.warm_image:
            raise UsageError("--warm-workers needs --warm-image: the image the standbys run "
                             "(only jobs with exactly this spec.image adopt one)")
