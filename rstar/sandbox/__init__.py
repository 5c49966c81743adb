"""Sandboxed execution of the policy model's Python steps (issue 3).

A pool of preloaded fork servers; programs run in forks locked down with rlimits, seccomp,
Landlock, a private network namespace and no capabilities: by default a fork runs many
programs (fresh globals each) and is replaced whenever one may have left state behind;
``SandboxConfig(fresh_process_per_run=True)`` gives every program its own fork. See
``docs/sandbox.md`` for what each mode does and does not guarantee.
"""

from rstar.sandbox._pool import Sandbox
from rstar.sandbox._types import ExecResult, SandboxConfig, Status, format_observation

__all__ = ["ExecResult", "Sandbox", "SandboxConfig", "Status", "format_observation"]
