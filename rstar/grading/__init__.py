"""Answer extraction and equivalence checking (math-verify behind fast paths and a memo cache)."""

from rstar.grading.extract import extract_answer, extract_boxed, strip_answer
from rstar.grading.grader import Grader, GraderStats, answers_equal, default_grader
from rstar.grading.normalize import clean_answer, gold_alternatives, normalize_answer

__all__ = [
    "extract_boxed",
    "extract_answer",
    "strip_answer",
    "Grader",
    "GraderStats",
    "answers_equal",
    "default_grader",
    "clean_answer",
    "normalize_answer",
    "gold_alternatives",
]
