"""Static screen of a compiled program: may it leave state behind in a reused child?

Reuse mode runs many programs in one locked-down child, each in fresh globals. A program
that could change interpreter state the next program sees is "tainting": it still runs in
the reused child, but the child exits after it (the next program gets a fresh fork). The
screen walks every code object (``co_names``, opcodes, string constants) and is run by the
child *before* the program starts, so nothing the program does can change the verdict.

It is a conservative filter for *accidental* leaks, not a proof: the runtime fingerprint
(``_state``) checks the common state after every program anyway, and strict mode
(``SandboxConfig(fresh_process_per_run=True)``) is the answer for adversarial programs.

A program taints when it

* uses a name from :data:`TAINT_NAMES` anywhere (as a global, an attribute or an imported
  module; dotted import names are split): dynamic attribute access and evaluation, the
  interpreter/process modules, introspection of frames, RNG seeding, global settings of
  numpy/decimal/sympy/warnings/locale, ...;
* uses a private name (``_x``, a single ``_`` is fine) or a dunder name outside
  :data:`SAFE_DUNDERS` (``__dict__``, ``__class__``, ``__globals__``, ``__import__``...);
* deletes an attribute (``DELETE_ATTR``) or stores one (``STORE_ATTR``), except
  ``self.x = ...`` / ``self.x += ...`` inside a method of a class the program defines
  (the first argument, never reassigned, in a class without ``staticmethod``);
* has a string constant that names something dynamic (``__`` other than a safe dunder
  such as ``"__main__"``, ``getattr``, ``exec``, ``import``...): strings handed to
  ``sympify``/``parse_expr``/``eval``-like APIs are code too.
"""

from __future__ import annotations

import dis
import re
from types import CodeType

#: Names whose use anywhere marks a program as tainting (see the module docstring).
TAINT_NAMES = frozenset({
    # dynamic attribute access / evaluation / namespaces
    "getattr", "setattr", "delattr", "globals", "vars", "locals", "exec", "eval", "compile",
    "breakpoint", "help", "attrgetter", "methodcaller",
    # interpreter, process, import machinery, low-level memory
    "sys", "os", "posix", "nt", "gc", "ctypes", "ctypeslib", "cffi", "inspect", "types",
    "builtins", "importlib", "imp", "pkgutil", "runpy", "zipimport", "site", "sysconfig",
    "signal", "threading", "multiprocessing", "concurrent", "subprocess", "asyncio",
    "atexit", "faulthandler", "pickle", "marshal", "shelve", "dill", "copyreg", "codecs",
    "locale", "logging", "tracemalloc", "pdb", "bdb", "cProfile", "profile", "doctest",
    "unittest", "weakref", "as_strided", "stride_tricks",
    # frames, code objects, generators
    "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "f_trace", "tb_frame",
    "tb_next", "gi_frame", "gi_code", "cr_frame", "ag_frame", "co_code", "co_consts",
    "currentframe", "walk_stack", "extract_stack",
    # process state
    "chdir", "fchdir", "environ", "putenv", "unsetenv", "umask", "setlocale",
    "setrecursionlimit", "set_int_max_str_digits", "settrace", "setprofile",
    "setswitchinterval", "modules", "displayhook", "excepthook",
    # global library settings and RNG seeding
    "seed", "set_state", "setstate", "set_printoptions", "set_string_function", "seterr",
    "seterrcall", "setbufsize", "setcontext", "getcontext", "DefaultContext",
    "BasicContext", "ExtendedContext", "init_printing", "init_session",
    "global_assumptions", "global_parameters", "converter", "register",
    "filterwarnings", "simplefilter", "resetwarnings", "showwarning", "formatwarning",
    "filters",
})

#: Dunder names that ordinary programs use harmlessly: the ``__main__`` guard, class-body
#: bookkeeping, special methods a small class defines (and ``super().__init__``).
SAFE_DUNDERS = frozenset({
    "__name__", "__main__", "__module__", "__qualname__", "__doc__", "__annotations__",
    "__slots__", "__version__", "__init__", "__new__", "__post_init__", "__repr__",
    "__str__", "__format__", "__hash__", "__bool__", "__len__", "__iter__", "__next__",
    "__reversed__", "__contains__", "__getitem__", "__setitem__", "__call__", "__enter__",
    "__exit__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__",
    "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
    "__imul__", "__matmul__", "__truediv__", "__rtruediv__", "__floordiv__",
    "__rfloordiv__", "__mod__", "__rmod__", "__divmod__", "__pow__", "__rpow__",
    "__neg__", "__pos__", "__abs__", "__invert__", "__int__", "__float__", "__complex__",
    "__index__", "__round__", "__floor__", "__ceil__", "__trunc__", "__and__", "__or__",
    "__xor__", "__lshift__", "__rshift__",
})

# A string constant that names something dynamic (code for sympify/parse_expr/eval...).
_DYNAMIC_STR = re.compile(
    r"__|\b(?:getattr|setattr|delattr|exec|eval|compile|globals|vars|locals|import|"
    r"breakpoint|builtins)\b")

_STORE_ATTR = dis.opmap["STORE_ATTR"]
_DELETE_ATTR = dis.opmap["DELETE_ATTR"]
_CO_OPTIMIZED = 0x1
_SELF_LOADS = {"LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_CHECK", "LOAD_CLOSURE"}
_NAME_STORES = {"STORE_FAST", "STORE_DEREF", "DELETE_FAST", "DELETE_DEREF"}


def screen(code: CodeType) -> str | None:
    """``None`` when ``code`` (and every code object inside it) is not tainting, else a
    short reason such as ``"name getattr"`` or ``"attribute store"``."""
    stack: list[tuple[CodeType, CodeType | None]] = [(code, None)]
    while stack:
        co, parent = stack.pop()
        why = _names(co.co_names)
        if why is not None:
            return why
        ops = co.co_code[::2]
        if _DELETE_ATTR in ops:
            return "attribute delete"
        if _STORE_ATTR in ops and not _self_stores_only(co, parent):
            return "attribute store"
        for c in co.co_consts:
            if isinstance(c, CodeType):
                stack.append((c, co))
            elif isinstance(c, str):
                if _DYNAMIC_STR.search(c) and c not in SAFE_DUNDERS:
                    return "dynamic string"
            elif isinstance(c, (tuple, frozenset)):
                for s in c:
                    if isinstance(s, str) and _DYNAMIC_STR.search(s) and s not in SAFE_DUNDERS:
                        return "dynamic string"
    return None


def _names(names: tuple[str, ...]) -> str | None:
    for name in names:
        if "." in name:  # import a.b.c
            for part in name.split("."):
                why = _names((part,))
                if why is not None:
                    return why
            continue
        if name in TAINT_NAMES:
            return f"name {name}"
        if name[:1] == "_" and name != "_" and name not in SAFE_DUNDERS:
            return f"name {name}"
    return None


def _self_stores_only(co: CodeType, parent: CodeType | None) -> bool:
    """Every STORE_ATTR in ``co`` targets ``self``: ``co`` is a method of a class body
    defined by the program, its first argument is never rebound, and each store is
    ``self.x = ...`` (LOAD self; STORE_ATTR) or ``self.x op= ...`` (LOAD self; COPY 1;
    LOAD_ATTR x; ...; SWAP 2; STORE_ATTR x)."""
    if (parent is None or parent.co_flags & _CO_OPTIMIZED or parent.co_name == "<module>"
            or not co.co_flags & _CO_OPTIMIZED or co.co_argcount < 1
            or "staticmethod" in parent.co_names):
        return False
    me = co.co_varnames[0]
    ins = list(dis.get_instructions(co))
    for i, x in enumerate(ins):
        if x.opname in _NAME_STORES and x.argval == me:
            return False
        if x.opcode != _STORE_ATTR:
            continue
        prev = ins[i - 1] if i else None
        if prev is None:
            return False
        if prev.opname in _SELF_LOADS and prev.argval == me:
            continue
        if prev.opname == "SWAP" and _augmented_self(ins, i, me):
            continue
        return False
    return True


def _augmented_self(ins: list[dis.Instruction], i: int, me: str) -> bool:
    name = ins[i].argval
    for j in range(i - 2, 1, -1):
        if (ins[j].opname == "LOAD_ATTR" and ins[j].argval == name
                and ins[j - 1].opname == "COPY" and ins[j - 1].arg == 1
                and ins[j - 2].opname in _SELF_LOADS and ins[j - 2].argval == me):
            return True
    return False
