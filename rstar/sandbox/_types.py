"""Public value types of the sandbox: config, status, result, and the observation format."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

OBSERVATION_HEAD = 512
OBSERVATION_TAIL = 512


@dataclass
class SandboxConfig:
    """Pool size and the limits applied to every program.

    ``memory_mb`` is the address space a program may add on top of the preloaded interpreter
    (RLIMIT_AS = server's own address space at fork time + memory_mb), so the default does not
    depend on how much numpy/scipy/OpenBLAS happen to map.

    ``fresh_process_per_run=False`` (default, "reuse mode"): a locked-down child runs many
    programs, each in fresh globals, and is replaced whenever a program may have changed
    state the next one would see (see docs/sandbox.md); ``True`` ("strict mode"): one fresh
    fork per program.
    """

    workers: int = 0  # 0 = CPUs available to this process
    timeout_s: float = 10.0  # wall clock per program
    cpu_time_s: float = 10.0  # RLIMIT_CPU (rounded up to whole seconds)
    memory_mb: int = 2048
    max_output_chars: int = 65536  # captured stdout cap (bigger -> OUTPUT_LIMIT failure)
    cache_size: int = 100_000  # programs; LRU; 0 disables
    isolate_network: bool = True  # network namespace when permitted, else seccomp/Landlock only
    preload: tuple[str, ...] = ("math", "sympy", "numpy", "scipy")
    # Extensions beyond docs/design.md's minimum:
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_file_mb: int = 64  # RLIMIT_FSIZE: largest file a program may write
    warmup: bool = True  # run typical sympy/numpy calls in the server before forking
    tmp_root: str | None = None  # where per-server scratch dirs live (default: tempfile dir)
    start_timeout_s: float = 60.0  # a server not ready by then is restarted
    extra_env: dict[str, str] = field(default_factory=dict)  # added to the server environment
    fresh_process_per_run: bool = False  # strict mode: one fork per program
    # Reuse mode: a child is replaced after this many programs, once it has used this much
    # CPU time in all (< 1 s: RLIMIT_CPU is cpu_time_s + 1 s of the child's total, a kernel
    # backstop behind the server's per-program check), or once its address space has grown
    # by this much (RLIMIT_AS is raised by as much, so every program keeps memory_mb).
    max_runs_per_child: int = 256
    recycle_cpu_s: float = 0.5
    recycle_memory_mb: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.recycle_cpu_s < 1:
            raise ValueError(f"recycle_cpu_s must be in (0, 1), got {self.recycle_cpu_s}")
        if self.max_runs_per_child < 1:
            raise ValueError(f"max_runs_per_child must be >= 1, got {self.max_runs_per_child}")
        if self.recycle_memory_mb < 0:
            raise ValueError(f"recycle_memory_mb must be >= 0, got {self.recycle_memory_mb}")


class Status(str, enum.Enum):
    """How a run ended. Only OK is a valid step; the others say why not."""

    OK = "ok"
    ERROR = "error"  # the program raised (incl. SystemExit/KeyboardInterrupt) or crashed
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit
    MEMORY = "memory"  # MemoryError under the address-space limit
    OUTPUT_LIMIT = "output_limit"  # more stdout (or a longer final value) than allowed
    KILLED = "killed"  # killed by a signal it did not ask for, server died, or pool closed
    FORBIDDEN = "forbidden"  # forbidden system call (process, exec, network...) or leaked thread


@dataclass(frozen=True)
class ExecResult:
    status: Status
    stdout: str  # raw captured stdout (capped)
    value: str | None  # repr of a final expression, notebook style (None not shown)
    error: str | None  # "TypeName: message" when not OK
    duration_s: float
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def observation(self) -> str:
        """What the model sees inside ``<output>...<end_of_output>`` (rStar conventions)."""
        if not self.ok:
            return format_observation(self.error or self.status.value)
        text = self.stdout
        if self.value is not None:
            if text and not text.endswith("\n"):
                text += "\n"
            text += self.value
        return format_observation(text.strip())


_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+")


def format_observation(text: str) -> str:
    """rStar-Math's ``truncate_string``: a float-like output is rounded to 4 decimals when
    that is shorter; anything longer than 1024 characters keeps its first and last 512.

    Only decimal/exponent literals count as float-like: plain integers are left exact (rStar's
    ``float(text)`` would turn a 30-digit integer into ``1.2345678901234568e+29``)."""
    stripped = text.strip()
    if _FLOAT_RE.fullmatch(stripped):
        try:
            rounded = str(round(float(stripped), 4))
        except (ValueError, OverflowError):
            rounded = stripped
        if len(rounded) < len(stripped):
            text = rounded
    if len(text) > OBSERVATION_HEAD + OBSERVATION_TAIL:
        text = text[:OBSERVATION_HEAD] + "..." + text[-OBSERVATION_TAIL:]
    return text
