"""`kubemr operator`: reconcile each MapReduceJob into task records, RBAC and a worker Job.

The operator is not a master: it never assigns work. It plans a job once (task records in
the job's task namespace), creates the workers (a batch/v1 Job whose pods run
`kubemr worker`) with a ServiceAccount that may touch only this job's objects, mirrors
progress into the status for printer columns, and cleans up when the job is decided.
Workers coordinate among themselves through the API server.

The rooms, each usable without the ones above it (the layers contract in pyproject.toml):

* :mod:`.config` -- how the operator is set up;
* :mod:`.podsecurity` -- the Pod Security Standards a worker pod is held to;
* :mod:`.resources` -- every object and patch the operator writes, as pure builders;
* :mod:`.tenancy` -- what the platform admin allows a namespace;
* :mod:`.queue` -- the coalescing work queue of job keys and its reconcile workers;
* :mod:`.admission` -- whether, and with which credentials, a job may run;
* :mod:`.reconcile` -- one job's reconcile, from plan to finalizer;
* :mod:`.followers` -- progress followers, one per running job;
* :mod:`.crashloop` -- whether worker pods that keep dying without progress fail the job;
* :mod:`.election` -- leader election's rules (client-go's), pure; :mod:`.leader` -- the
  Lease read and written on its schedule;
* :mod:`.controller` -- :class:`Operator`: the watch, the resync, the workers and the
  followers in one task group.

All API calls go through :mod:`kubemr_async.kube`; nothing here imports a Kubernetes client.
"""

from .config import LeaderElection, OperatorConfig
from .controller import Operator
from .leader import LeadershipLost
from .resources import FINALIZER, worker_names

__all__ = ["FINALIZER", "LeaderElection", "LeadershipLost", "Operator", "OperatorConfig",
           "worker_names"]
