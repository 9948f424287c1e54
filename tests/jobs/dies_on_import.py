"""A job module whose import kills its process (SIGKILL), as one that runs out of memory
loading a model at import would: the worker dies before it claims any task."""

from __future__ import annotations

import os
import signal
import sys

print("dies_on_import: killing the worker at import", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
