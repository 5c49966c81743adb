"""Pristine-state snapshot, cheap restore and fingerprint check for reused children.

The server takes a :class:`Pristine` snapshot after preloading and warming up (children
inherit it through ``fork``). After every program a reused child calls
:meth:`Pristine.reset`, which

1. **restores** known global state a program may legitimately change without any tainting
   name (the RNGs advance when used) or that is cheap to put back: ``random`` and sympy's
   ``rng`` state, numpy's legacy RNG, the ``decimal`` context, numpy print options,
   ``seterr`` and buffer size, ``scipy.special`` errors, ``warnings`` filters, ``sys.path``,
   recursion limit, int max str digits, mpmath precision, sympy's global parameters and
   assumptions, the cwd; then
2. **verifies** a fingerprint of what cannot be restored cheaply and returns what differs
   (the child then exits): ``sys.modules`` (identity of every entry), ``builtins``, the
   dicts of the preloaded hot modules (identity of every value), sympy's printer settings,
   the ``decimal`` template contexts, ``sys`` hooks, ``gc`` settings, signal handlers and
   interval timers, ``os.environ``, interpreter-wide import hooks.

Dict fingerprints are cheap because CPython (3.11-3.13) bumps a dict's version tag (PEP 509
``ma_version_tag``) on every change: the tag is read with ctypes (after a self-test at
snapshot time) and the dict is compared value by value only when its tag moved. Where the
tag is unusable (another interpreter, a different layout) every dict is compared in full.
Cost per program, measured in a warmed-up server on the dev VM: see ``docs/sandbox.md``.
"""

from __future__ import annotations

import builtins
import ctypes
import gc
import os
import signal
import sys
import warnings
from typing import Any

#: Modules whose namespace is fingerprinted after every program (when loaded).
HOT_MODULES = ("math", "cmath", "fractions", "decimal", "itertools", "functools",
               "collections", "statistics", "random", "numpy", "sympy", "scipy", "mpmath",
               "operator", "heapq", "bisect", "string", "re", "copy", "numbers", "warnings",
               "numpy.random", "numpy.linalg", "sympy.abc", "sympy.core.numbers",
               "sympy.core.singleton", "scipy.optimize", "scipy.special", "scipy.integrate")

_SIGNALS = tuple(getattr(signal, s) for s in (
    "SIGALRM", "SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGCHLD",
    "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF") if hasattr(signal, s))
_MT_STATE_BYTES = 624 * 4 + 4  # numpy mt19937_state: uint32 key[624]; int pos


def _version_view_factory() -> Any:
    """A function dict -> ctypes view of its version tag, or None when the tag cannot be
    trusted here (checked on probe dicts: it must move on every change and only then)."""
    if sys.implementation.name != "cpython":
        return None
    used_at = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
    tag_at = used_at + ctypes.sizeof(ctypes.c_ssize_t)

    def view(d: dict[Any, Any]) -> Any:
        return ctypes.c_uint64.from_address(id(d) + tag_at)

    try:
        probe: dict[str, Any] = {}
        used = ctypes.c_ssize_t.from_address(id(probe) + used_at)
        tag = view(probe)
        seen = [tag.value]
        for change in (lambda: probe.__setitem__("a", 1), lambda: probe.__setitem__("a", 2),
                       lambda: probe.__setitem__("b", 3), lambda: probe.pop("a"),
                       lambda: probe.update(c=4), probe.clear):
            if tag.value != seen[-1] or view(probe).value != seen[-1]:  # stable when unchanged
                return None
            change()
            if tag.value in seen or used.value != len(probe):
                return None
            seen.append(tag.value)
        other = {"x": 1}
        if view(other).value == tag.value:
            return None
    except Exception:  # noqa: BLE001
        return None
    return view


_VIEW = _version_view_factory()


class _Fingerprint:
    """One dict that must keep its entries (identity of values) between programs."""

    __slots__ = ("label", "d", "saved", "view", "tag")

    def __init__(self, label: str, d: dict[Any, Any]) -> None:
        self.label = label
        self.d = d  # held, so the view's address stays valid
        self.saved = dict(d)
        self.view = _VIEW(d) if _VIEW is not None else None
        self.tag = self.view.value if self.view is not None else 0

    def changed(self) -> bool:
        if self.view is not None and self.view.value == self.tag:
            return False
        try:
            same = len(self.d) == len(self.saved) and bool(self.d == self.saved)
        except BaseException:  # noqa: BLE001 - a replaced value with an odd __eq__
            same = False
        if same and self.view is not None:
            self.tag = self.view.value  # rewritten with the same values: fine
        return not same

    def retake(self) -> None:
        self.saved = dict(self.d)
        self.tag = self.view.value if self.view is not None else 0


class Pristine:
    """What a program should find, captured once in the server after its warm-up (children
    inherit it through fork; see the module doc)."""

    def __init__(self) -> None:
        m = sys.modules  # (nothing below may import anything: fingerprints come last)
        self.path = list(sys.path)
        self.meta_path = list(sys.meta_path)
        self.path_hooks = list(sys.path_hooks)
        self.recursion_limit = sys.getrecursionlimit()
        self.int_digits = sys.get_int_max_str_digits()
        self.hooks = self._hooks()
        self.gc = (gc.isenabled(), gc.get_threshold())
        self.warn_filters_list = warnings.filters
        self.warn_filters = list(warnings.filters)
        self.warn_default = warnings.defaultaction
        self.random = m["random"]._inst.getstate() if "random" in m else None
        self.sympy_rng = None
        if "sympy.core.random" in m:
            self.sympy_rng = m["sympy.core.random"].rng.getstate()
        self.decimal = None
        if "decimal" in m:
            dec = m["decimal"]
            self.decimal = dec.getcontext().copy()
            self.decimal_default = repr(dec.DefaultContext)
        self.numpy = None
        if "numpy" in m:
            np = m["numpy"]
            self.numpy = np
            self.np_print = np.get_printoptions()
            self.np_err = np.geterr()
            self.np_errcall = np.geterrcall()
            self.np_bufsize = np.getbufsize()
        self.np_rng = None
        if "numpy.random.mtrand" in m:
            rs = m["numpy.random.mtrand"]._rand
            self.np_rng = rs
            self.np_rng_state = rs.get_state()
            self.np_rng_addr = rs._bit_generator.ctypes.state_address
            self.np_rng_bytes = ctypes.string_at(self.np_rng_addr, _MT_STATE_BYTES)
        self.special = None
        if "scipy.special" in m:
            self.special = m["scipy.special"]
            self.special_err = self.special.geterr()
        self.mp = None
        if "mpmath" in m:
            self.mp = m["mpmath"].mp
            self.mp_state = (self.mp.prec, self.mp.pretty)
        self.sympy_params = self.printer = self.assumptions = None
        if "sympy.core.parameters" in m:
            self.sympy_params = m["sympy.core.parameters"].global_parameters
            self.sympy_params_state = self._params()
        if "sympy.printing.printer" in m:
            self.printer = m["sympy.printing.printer"].Printer
            self.printer_settings = dict(self.printer._global_settings)
        if "sympy.assumptions.assume" in m:
            self.assumptions = m["sympy.assumptions.assume"].global_assumptions
            self.assumptions_state = set(self.assumptions)
        self.environ: dict[bytes, bytes] = {}
        self.signals: tuple[Any, ...] = ()
        self.modules = _Fingerprint("sys.modules", m)
        self.builtins_fp = _Fingerprint("builtins", builtins.__dict__)
        self.builtins = self.builtins_fp.saved
        self.hot = [_Fingerprint(f"module {name}", m[name].__dict__)
                    for name in HOT_MODULES if name in m]

    def refresh(self) -> None:
        """In the server before a fork: re-take any fingerprint whose dict changed since."""
        for fp in (self.modules, self.builtins_fp, *self.hot):
            if fp.changed():
                fp.retake()
        self.builtins = self.builtins_fp.saved

    def child_started(self) -> None:
        """In the child after its lockdown (which sets TMPDIR/HOME and SIGXFSZ; and CPython
        reseeds ``random`` at fork, as for a strict-mode child)."""
        self.environ = dict(os.environ._data)  # type: ignore[attr-defined]
        self.signals = tuple(signal.getsignal(s) for s in _SIGNALS)
        if "random" in sys.modules:
            self.random = sys.modules["random"]._inst.getstate()

    @staticmethod
    def _hooks() -> tuple[Any, ...]:
        return (sys.displayhook, sys.excepthook, sys.gettrace(), sys.getprofile(),
                sys.getswitchinterval(), sys.unraisablehook, sys.breakpointhook)

    def _params(self) -> tuple[Any, ...]:
        p = self.sympy_params
        return (p.evaluate, p.distribute, p.exp_is_pow)

    # -- after every program ---------------------------------------------------------------

    def restore_builtins(self) -> None:
        """Put ``builtins`` back if the program touched it (it may have deleted ``len``)."""
        if self.builtins_fp.view is None or self.builtins_fp.view.value != self.builtins_fp.tag:
            d = builtins.__dict__
            d.clear()
            d.update(self.builtins)

    def reset(self, cwd: str) -> str | None:
        """Restore the known state, then return what else changed (None: pristine)."""
        try:
            self._restore(cwd)
            return self._verify()
        except BaseException as e:  # noqa: BLE001 - anything odd means: do not reuse
            return f"check failed ({type(e).__name__})"

    def _restore(self, cwd: str) -> None:
        m = sys.modules
        os.chdir(cwd)
        sys.setrecursionlimit(self.recursion_limit)
        sys.set_int_max_str_digits(self.int_digits)
        if sys.path != self.path:
            sys.path[:] = self.path
        if warnings.filters is not self.warn_filters_list:
            warnings.filters = self.warn_filters_list
            warnings.filters[:] = self.warn_filters
            warnings._filters_mutated()  # type: ignore[attr-defined]
        elif warnings.filters != self.warn_filters:
            warnings.filters[:] = self.warn_filters
            warnings._filters_mutated()  # type: ignore[attr-defined]
        warnings.defaultaction = self.warn_default
        if self.random is not None:
            m["random"]._inst.setstate(self.random)
        if self.sympy_rng is not None:
            m["sympy.core.random"].rng.setstate(self.sympy_rng)
        if self.decimal is not None:
            m["decimal"].setcontext(self.decimal.copy())
        np = self.numpy
        if np is not None:
            if np.get_printoptions() != self.np_print:
                np.set_printoptions(**self.np_print)
            if np.geterr() != self.np_err:
                np.seterr(**self.np_err)
            if np.geterrcall() is not self.np_errcall:
                np.seterrcall(self.np_errcall)
            if np.getbufsize() != self.np_bufsize:
                np.setbufsize(self.np_bufsize)
        if self.np_rng is not None:
            if ctypes.string_at(self.np_rng_addr, _MT_STATE_BYTES) != self.np_rng_bytes:
                self.np_rng.set_state(self.np_rng_state)
        if self.special is not None and self.special.geterr() != self.special_err:
            self.special.seterr(**self.special_err)
        if self.mp is not None and (self.mp.prec, self.mp.pretty) != self.mp_state:
            self.mp.prec, self.mp.pretty = self.mp_state
        if self.sympy_params is not None and self._params() != self.sympy_params_state:
            p = self.sympy_params
            p.evaluate, p.distribute, p.exp_is_pow = self.sympy_params_state
        if self.assumptions is not None and set(self.assumptions) != self.assumptions_state:
            self.assumptions.clear()
            self.assumptions.update(self.assumptions_state)

    def _verify(self) -> str | None:
        m = sys.modules
        if self.modules.changed():
            new = sorted(set(m) - set(self.modules.saved))[:3]
            return f"sys.modules changed {new}" if new else "sys.modules changed"
        if self.builtins_fp.changed():
            return "builtins changed"
        for fp in self.hot:
            if fp.changed():
                return f"{fp.label} changed"
        if self.printer is not None and self.printer._global_settings != self.printer_settings:
            return "sympy printer settings changed"
        if self.decimal is not None and repr(m["decimal"].DefaultContext) != self.decimal_default:
            return "decimal.DefaultContext changed"
        if self._hooks() != self.hooks:
            return "sys hooks changed"
        if sys.meta_path != self.meta_path or sys.path_hooks != self.path_hooks:
            return "import hooks changed"
        if (gc.isenabled(), gc.get_threshold()) != self.gc:
            return "gc settings changed"
        if tuple(signal.getsignal(s) for s in _SIGNALS) != self.signals:
            return "signal handlers changed"
        for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            if signal.getitimer(timer) != (0.0, 0.0):
                return "interval timer armed"
        if os.environ._data != self.environ:  # type: ignore[attr-defined]
            return "environment changed"
        return None
