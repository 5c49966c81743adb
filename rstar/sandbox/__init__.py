"""Sandboxed execution of the policy model's Python steps (issue 3).

A pool of preloaded fork servers; each program runs in a fresh fork that is locked down with
rlimits, seccomp, Landlock, a private network namespace and no capabilities. See
``docs/sandbox.md`` for what is and is not guaranteed.
"""

from rstar.sandbox._pool import Sandbox
from rstar.sandbox._types import ExecResult, SandboxConfig, Status, format_observation

__all__ = ["ExecResult", "Sandbox", "SandboxConfig", "Status", "format_observation"]
