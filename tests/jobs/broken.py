"""A job module whose import fails inside the worker, as a broken image would."""

raise RuntimeError("this image ships a broken job module")
