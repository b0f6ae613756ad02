"""Fault injection for the reliability tests: kill or fail the process at a named point of a write.

Production code calls ``fault_point("name", index)`` at the few places where an interruption matters most (after a
layer's resume checkpoint is committed, between writing temporary files and renaming them, before the output
directory is moved into place). Unless the environment variable ``OLICA_FAULT_INJECTION`` is set, a call is one
dictionary lookup, once per layer or per file at most: nothing runs in the per-batch loops.

``OLICA_FAULT_INJECTION="<point>[:<index>][:<action>]"`` arms one point; ``index`` limits it to one layer (default:
the first time the point is reached) and ``action`` is ``kill`` (default: ``SIGKILL`` to this process, as an
out-of-memory killer or a pre-empted machine would) or ``raise`` (an ``InjectedFault``, for in-process tests).
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "OLICA_FAULT_INJECTION"


class InjectedFault(RuntimeError):
    """Raised at an armed fault point with the ``raise`` action."""


def fault_point(name: str, index: int | None = None) -> None:
    """Kill the process or raise here if ``OLICA_FAULT_INJECTION`` arms this point (and this index)."""
    spec = os.environ.get(ENVIRONMENT_VARIABLE)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    parts = rest.split(":") if rest else []
    action = parts.pop() if parts and parts[-1] in ("kill", "raise") else "kill"
    if parts and (index is None or int(parts[0]) != index):
        return
    if action == "raise":
        raise InjectedFault(f"injected fault at {name} (index {index})")
    os.kill(os.getpid(), signal.SIGKILL)
