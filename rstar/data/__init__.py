"""Problems: loaders (benchmark names, JSON, JSONL, Hugging Face datasets) and validation."""

from rstar.data.benchmarks import ALIASES, BENCHMARKS, benchmark_names, default_data_dirs, resolve_benchmark
from rstar.data.loaders import load_problems, load_with_report
from rstar.data.problem import DataError, DuplicateQuestion, Problem, ValidationReport, rows_to_problems

__all__ = [
    "Problem",
    "DataError",
    "DuplicateQuestion",
    "ValidationReport",
    "load_problems",
    "load_with_report",
    "rows_to_problems",
    "resolve_benchmark",
    "default_data_dirs",
    "benchmark_names",
    "BENCHMARKS",
    "ALIASES",
]
