"""How the operator is set up: what it watches, how workers reach storage, how it paces."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Failed worker pods tolerated before the job fails (workers crash, they do not err).
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
