"""pytest configuration of the engine benchmarks (``pytest bench/``).

Collects ``bench_*.py``, gathers every figure into one session report, and prints it as a
table (with each figure's ratio to its in-run baseline) at the end of the session."""

from __future__ import annotations

from typing import Any

import pytest

from bench_engine import Report, reference_forest, synthetic_search


class SessionReport(Report):
    """The report plus what several benchmarks share: reference runs and the reference speed."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[Any, Any] = {}
        self._ref_rate: float | None = None

    def reference_rate(self) -> float:
        """Simulations/s of the pure-Python reference (B=64, A=8, 16 sims), measured once; used
        to skip reference runs that would take longer than REFERENCE_BUDGET_S."""
        if self._ref_rate is None:
            secs, done = synthetic_search(reference_forest(), 64, 8, 16)
            self._ref_rate = done / secs
        return self._ref_rate


_REPORT = SessionReport()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("python_files", "bench_*.py")


@pytest.fixture(scope="session")
def engine_report() -> SessionReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _REPORT.rows:
        return
    terminalreporter.section("rstar engine benchmarks (ratios measured in this run)")
    for line in _REPORT.table().splitlines():
        terminalreporter.write_line(line)
