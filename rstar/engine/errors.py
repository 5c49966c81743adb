"""Exception classes of the engine contract (``rstar/_core.pyi``), in pure Python.

The C++ extension defines classes with the same names and the same bases; the pure-Python
reference raises these. Code that must handle both (tests, drivers that can run either
engine) compares exceptions by class name, or catches the common bases (``ValueError``,
``KeyError``, ``MemoryError``, ``RuntimeError``), which both hierarchies share."""

from __future__ import annotations

__all__ = ["ForestError", "ForestStateError", "CapacityError", "UnknownIdError"]


class ForestError(RuntimeError):
    """Base class of the engine's own errors (shape and value errors are ``ValueError``)."""


class ForestStateError(ForestError):
    """The operation is not allowed in the node's (or tree's) current state, e.g. expanding a
    leaf twice, initialising a node's value twice, releasing a tree with open tickets."""


class CapacityError(ForestError, MemoryError):
    """The node arena is full (``max_nodes``); nothing was changed."""


class UnknownIdError(ForestError, KeyError):
    """An unknown, released or already resolved tree, node or ticket id."""

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""
