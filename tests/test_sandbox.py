"""rstar.sandbox: semantics, isolation against hostile programs, pool behaviour.

Pools run in reuse mode (the default) unless ``RSTAR_SANDBOX_TEST_STRICT=1``, which runs the
whole file in strict mode; the hostile-program and state-leak tests run in both modes.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from rstar.sandbox import ExecResult, Sandbox, SandboxConfig, Status, format_observation
from rstar.sandbox._corpus import typical_steps
from rstar.sandbox._screen import screen

pytestmark = pytest.mark.timeout(120)

STRICT = os.environ.get("RSTAR_SANDBOX_TEST_STRICT") == "1"  # default mode of these pools
CFG = SandboxConfig(workers=2, timeout_s=3.0, cpu_time_s=1.0, memory_mb=512,
                    max_output_chars=10_000, max_file_mb=8, cache_size=0,
                    fresh_process_per_run=STRICT)
# One server per mode for the hostile and leak tests (consecutive runs share its child);
# 256 MB so that filling the address space stays well within 1 s of CPU on a loaded machine.
ONE = dataclasses.replace(CFG, workers=1, memory_mb=256, preload=("math", "numpy", "sympy"),
                          warmup=False)
LIGHT = dict(preload=("math",), warmup=False, fresh_process_per_run=STRICT)  # lifecycle tests
MODES = ["reuse", "strict"]


def _proc_table() -> dict[int, int]:
    """pid -> ppid for every live (non-zombie) process, from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z":
            table[int(name)] = int(rest[1])
    return table


def _descendants(pid: int) -> set[int]:
    table = _proc_table()
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in table.items() if pp in frontier and p not in out}
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def sb():
    with Sandbox(CFG) as s:
        s.wait_ready(180)
        yield s


@pytest.fixture(scope="module")
def _one_pools():
    pools: dict[str, Sandbox] = {}
    yield pools
    for s in pools.values():
        s.close()


@pytest.fixture(params=MODES)
def sb1(request, _one_pools) -> Sandbox:
    """A one-server pool in each mode (shared by the tests of this module)."""
    mode = request.param
    if mode not in _one_pools:
        s = Sandbox(dataclasses.replace(ONE, fresh_process_per_run=mode == "strict"))
        s.wait_ready(180)
        _one_pools[mode] = s
    return _one_pools[mode]


def _strict(sb: Sandbox) -> bool:
    return sb.config.fresh_process_per_run


def _unharmed(sb: Sandbox, pids_before: list[int]) -> None:
    """The pool still answers, no server was replaced, and no run left a process behind:
    a server's only descendant is its current reuse-mode child, which has none."""
    assert sb.run("print(6 * 7)").stdout == "42\n"
    assert sb.server_pids() == pids_before
    workers = set(sb.worker_pids())
    if _strict(sb):
        assert workers == set()
    under = [_descendants(pid) for pid in pids_before]
    assert all(d - workers == set() for d in under)
    assert workers <= set().union(*under)  # each reported child is a live child of a server
    for pid in workers:
        assert _descendants(pid) == set()


# ------------------------------------------------------------------------- normal programs

def test_isolation_layers_active(sb):
    iso = sb.isolation
    if os.geteuid() != 0:
        pytest.skip("namespaces and capability drop need root")
    assert iso["network_namespace"] and iso["seccomp"] and iso["drop_capabilities"]
    if iso["landlock_abi"] == 0:
        pytest.skip(f"kernel without Landlock: {sb.problems}")


def test_sympy_solve(sb):
    r = sb.run("import sympy as sp\nx = sp.symbols('x')\nsol = sp.solve(x**2 - 5*x + 6, x)\n"
               "print(sol)")
    assert r.status is Status.OK and r.stdout == "[2, 3]\n" and r.observation == "[2, 3]"


def test_numpy_and_final_expression(sb):
    r = sb.run("import numpy as np\na = np.array([1.0, 2.0, 3.0])\nfloat(a.mean() / 3)")
    assert r.ok and r.value == "0.6666666666666666" and r.observation == "0.6667"


def test_fractions_loops_nested_prints(sb):
    code = textwrap.dedent("""
        from fractions import Fraction
        total = Fraction(0)
        for k in range(1, 4):
            if k % 2:
                for j in range(2):
                    print(k, j)
            total += Fraction(1, k)
        def show():
            print("total", total)
        show()
        total
    """)
    r = sb.run(code)
    assert r.ok
    assert r.stdout == "1 0\n1 1\n3 0\n3 1\ntotal 11/6\n"
    assert r.value == "Fraction(11, 6)"
    assert r.observation == "1 0\n1 1\n3 0\n3 1\ntotal 11/6\nFraction(11, 6)"


def test_none_final_value_not_shown(sb):
    r = sb.run("print('hi')\nNone")
    assert r.ok and r.value is None and r.observation == "hi"
    r = sb.run("x = 1\nprint(x)")
    assert r.ok and r.value is None and r.observation == "1"


def test_validity_not_from_words(sb):
    r = sb.run("relative_error = 0.1\nprint('error:', relative_error, 'Traceback')")
    assert r.status is Status.OK and r.error is None


def test_exceptions_are_errors(sb):
    r = sb.run("x = 1\nprint('before')\n1 / 0")
    assert r.status is Status.ERROR and r.error == "ZeroDivisionError: division by zero"
    assert r.stdout == "before\n" and r.observation == "ZeroDivisionError: division by zero"
    r = sb.run("def f(:\n  pass")
    assert r.status is Status.ERROR and r.error.startswith("SyntaxError: ")
    r = sb.run("import sympy\nsympy.sympify('1 +* 2')")
    assert r.status is Status.ERROR and r.error.startswith("SympifyError")


def test_main_guard_and_dunder_name(sb):
    r = sb.run("def main():\n    print('ran')\nif __name__ == '__main__':\n    main()")
    assert r.ok and r.stdout == "ran\n"


def test_no_variable_leaks(sb1):
    sb = sb1
    assert sb.run("secret = 41\nsecret + 1").value == "42"
    r = sb.run("print(secret)")
    assert r.status is Status.ERROR and r.error == "NameError: name 'secret' is not defined"


def test_module_state_is_pristine_next_run(sb1):
    sb = sb1
    r = sb.run("import math, sys, builtins, sympy, decimal\nmath.pi = 3\nsympy.pi = 4\n"
               "sys.modules['numpy'] = None\ndecimal.getcontext().prec = 3\nprint('patched')\n"
               "sys.setrecursionlimit(50)\ndel builtins.len\n42")
    assert r.ok and r.stdout == "patched\n" and r.value == "42"
    r = sb.run("import math, sys, sympy, numpy, decimal\n"
               "print(math.pi, sympy.pi, numpy.__name__, len('ab'), sys.getrecursionlimit(),"
               " decimal.getcontext().prec)")
    assert r.ok and r.stdout == "3.141592653589793 pi numpy 2 1000 28\n"


def test_cwd_is_private_and_removed(sb1):
    sb = sb1
    r = sb.run("import os, tempfile\nopen('a.txt', 'w').write('x')\n"
               "tempfile.NamedTemporaryFile(delete=False).write(b'y')\n"
               "print(sorted(os.listdir('.')) == sorted(os.listdir(tempfile.gettempdir())))\n"
               "print(len(os.listdir('.')))")
    assert r.ok and r.stdout == "True\n2\n"
    r = sb.run("import os\nprint(os.listdir('.'))")
    assert r.ok and r.stdout == "[]\n"


def test_run_many_order_and_futures(sb):
    progs = [f"import time\ntime.sleep({0.05 * (i % 3)})\nprint({i})" for i in range(12)]
    res = sb.run_many(progs)
    assert [r.stdout for r in res] == [f"{i}\n" for i in range(12)]
    futs = [sb.submit(f"{i} * 2") for i in range(5)]
    assert [f.result(timeout=60).value for f in futs] == ["0", "2", "4", "6", "8"]


def test_asyncio(sb):
    async def main():
        return await asyncio.gather(*(sb.arun(f"print({i}**2)") for i in range(6)))

    res = asyncio.run(main())
    assert [r.stdout for r in res] == [f"{i * i}\n" for i in range(6)]


def test_cache_lru_and_dedup():
    with Sandbox(SandboxConfig(workers=1, cache_size=2, **LIGHT)) as s:
        a = s.run("print('a')")
        assert a.ok and not a.cached
        assert s.run("print('a')").cached
        s.run("print('b')")
        s.run("print('c')")  # evicts 'a'
        assert not s.run("print('a')").cached
        assert s.run("print('c')").cached
        # identical programs in flight together run once
        futs = [s.submit("import time\ntime.sleep(0.2)\nprint('d')") for _ in range(4)]
        res = [f.result(60) for f in futs]
        assert all(r.stdout == "d\n" for r in res) and sum(not r.cached for r in res) == 1
        assert s.stats["cache_hits"] >= 2


def test_timeouts_not_cached():
    with Sandbox(SandboxConfig(workers=1, timeout_s=0.5, cache_size=10, **LIGHT)) as s:
        assert s.run("while True: pass").status is Status.TIMEOUT
        r = s.run("while True: pass")
        assert r.status is Status.TIMEOUT and not r.cached


# ------------------------------------------------------------------------- format_observation

def test_format_observation():
    assert format_observation("0.3333333333333333") == "0.3333"
    assert format_observation("0.5\n") == "0.5\n"
    assert format_observation("2.5e-07") == "0.0"  # round(2.5e-07, 4): paper's rule
    assert format_observation("123456789012345678901234567890") == \
        "123456789012345678901234567890"  # integers stay exact
    assert format_observation("x = 0.333333333") == "x = 0.333333333"
    long = "a" * 600 + "b" * 600
    out = format_observation(long)
    assert out == "a" * 512 + "..." + "b" * 512
    assert format_observation("c" * 1024) == "c" * 1024


def test_observation_of_failures():
    r = ExecResult(Status.TIMEOUT, "", None, "TimeoutError: x", 1.0, False)
    assert not r.ok and r.observation == "TimeoutError: x"


# --------------------------------------------------------------------------- hostile programs

HOSTILE: list[tuple[str, str, Status, str | None]] = [
    ("busy_loop", "while True: pass", Status.TIMEOUT, "CPU-time"),
    ("sleep_past_timeout", "import time\ntime.sleep(60)", Status.TIMEOUT, "wall-clock"),
    ("ignore_xcpu", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
     Status.TIMEOUT, "TimeoutError"),
    ("print_bomb", "while True:\n    print('x' * 100)", Status.OUTPUT_LIMIT,
     "OutputLimitExceeded"),
    ("one_huge_print", "print('y' * 10**7)", Status.OUTPUT_LIMIT, "OutputLimitExceeded"),
    ("huge_final_value", "'z' * 10**6", Status.OUTPUT_LIMIT, "final value"),
    ("stdout_swap_bomb", "import sys\nw = sys.stdout.write\nwhile True: w('q' * 999)",
     Status.OUTPUT_LIMIT, None),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()", Status.FORBIDDEN, "SandboxViolation"),
    ("subprocess_run", "import subprocess\nsubprocess.run(['echo', 'hi'])", Status.FORBIDDEN,
     None),
    ("os_system", "import os\nos.system('touch /tmp/pwned')", Status.FORBIDDEN, None),
    ("execv", "import os\nos.execv('/bin/sh', ['sh', '-c', 'true'])", Status.FORBIDDEN, None),
    ("multiprocessing", "import multiprocessing as mp\nmp.Process(target=print).start()",
     Status.FORBIDDEN, None),
    ("socket_connect", "import socket\ns = socket.create_connection(('127.0.0.1', 22), 1)",
     Status.FORBIDDEN, None),
    ("kill_parent", "import os\nos.kill(os.getppid(), 9)", Status.FORBIDDEN, None),
    ("kill_everyone", "import os\nos.kill(-1, 9)", Status.FORBIDDEN, None),
    ("killpg_parent", "import os\nos.killpg(os.getpgid(os.getppid()), 15)", Status.FORBIDDEN,
     None),
    ("ptrace_parent", "import ctypes, os\nctypes.CDLL(None).syscall(101, 16, os.getppid(), 0, 0)",
     Status.FORBIDDEN, None),
    ("raise_rlimit", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
     Status.FORBIDDEN, None),
    ("unshare", "import ctypes\nctypes.CDLL(None).unshare(0x20000)", Status.FORBIDDEN, None),
    ("daemon_thread_outlives", "import threading, time\n"
     "threading.Thread(target=lambda: time.sleep(100), daemon=True).start()\nprint('started')",
     Status.FORBIDDEN, "thread"),
    # a spin that allocates nothing: a growing list would hit the memory limit within the
    # second on a fast machine, end the thread with a MemoryError and let the program pass
    ("thread_forever", "import threading\n"
     "def spin():\n    while True:\n        pass\n"
     "threading.Thread(target=spin).start()",
     Status.TIMEOUT, None),
    ("memory_bytearray", "x = bytearray(50 * 2**30)", Status.MEMORY, "MemoryError"),
    ("memory_list", "x = [0] * (10**10)", Status.MEMORY, "MemoryError"),
    ("memory_numpy", "import numpy as np\na = np.ones((10**6, 10**5))", Status.MEMORY,
     "MemoryError"),
    ("memory_growth", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))",
     Status.MEMORY, "MemoryError"),
    ("ctypes_segfault", "import ctypes\nctypes.string_at(0)", Status.ERROR, "SIGSEGV"),
    ("c_stack_overflow", "import sys\nsys.setrecursionlimit(10**7)\nclass A:\n"
     "    def __init__(s, n): s.n = n\n    def __repr__(s): return repr(A(s.n + 1))\ns = repr(A(0))",
     Status.ERROR, "Crash: SIGSEGV"),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", Status.ERROR, "RecursionError"),
    ("sys_exit_0", "import sys\nprint('bye')\nsys.exit(0)", Status.ERROR, "SystemExit: 0"),
    ("raise_system_exit", "raise SystemExit('later')", Status.ERROR, "SystemExit: later"),
    ("os_exit_3", "import os\nos._exit(3)", Status.ERROR, "ProcessExit"),
    ("keyboard_interrupt", "raise KeyboardInterrupt", Status.ERROR, "KeyboardInterrupt"),
    ("alarm_self", "import signal, time\nsignal.alarm(1)\ntime.sleep(2.5)", Status.KILLED,
     "SIGALRM"),
    ("sigkill_self", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", Status.KILLED,
     "SIGKILL"),
    ("abort", "import os\nos.abort()", Status.ERROR, "SIGABRT"),
    ("many_fds", "fs = [open('/dev/null') for _ in range(100000)]", Status.ERROR,
     "Too many open files"),
    ("big_file", "open('big', 'wb').write(b'0' * (16 * 2**20))", Status.ERROR, "File too large"),
    ("write_outside_cwd", "import os\nos.chdir('/')\nopen('pwned', 'w')", Status.ERROR,
     "PermissionError"),
    ("write_dev_shm", "open('/dev/shm/pwned', 'w')", Status.ERROR, "PermissionError"),
    ("read_proc_parent", "import os\nopen(f'/proc/{os.getppid()}/environ').read()",
     Status.ERROR, "PermissionError"),
    ("list_proc", "import os\nos.listdir('/proc')", Status.ERROR, "PermissionError"),
    ("input", "input('? ')", Status.ERROR, "EOFError"),
    ("del_builtins_print", "import builtins\ndel builtins.print\nprint(1)", Status.ERROR,
     "NameError"),
]


NEEDS_LANDLOCK = {"write_outside_cwd", "write_dev_shm", "read_proc_parent", "list_proc"}


def _need_landlock(sb: Sandbox) -> None:
    if not sb.isolation.get("landlock_abi"):
        pytest.skip(f"file-system confinement needs Landlock: {sb.problems}")


@pytest.mark.parametrize("name,code,status,fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile(sb1, name, code, status, fragment):
    sb = sb1
    if name in NEEDS_LANDLOCK:
        _need_landlock(sb)
    pids = sb.server_pids()
    recycled = sb.stats["recycled"]
    r = sb.run(code)
    assert r.status is status, (name, r)
    if fragment is not None:
        assert fragment in (r.error or ""), (name, r)
    assert not r.ok and r.error
    if sb.stats["recycled"] == recycled:  # its child was reused: a plain Python exception
        assert not _strict(sb) and r.status is Status.ERROR
        assert not r.error.startswith(("Crash", "ProcessExit", "SandboxError"))
        assert screen(compile(ast.parse(code), "<s>", "exec")) is None
    _unharmed(sb, pids)


def test_hostile_count():
    assert len(HOSTILE) >= 30


def test_write_tmp_outside_fails(sb, tmp_path):
    _need_landlock(sb)
    target = f"/tmp/rstar-sbx-test-{uuid.uuid4().hex}"
    r = sb.run(f"open({target!r}, 'w').write('x')")
    assert r.status is Status.ERROR and r.error.startswith("PermissionError")
    assert not os.path.exists(target)
    _unharmed(sb, sb.server_pids())


def test_remove_file_outside_fails(sb, tmp_path):
    _need_landlock(sb)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    r = sb.run(f"import os\nos.remove({str(victim)!r})")
    assert r.status is Status.ERROR and r.error.startswith("PermissionError")
    assert victim.read_text() == "keep me"
    r = sb.run(f"import shutil\nshutil.rmtree({str(tmp_path)!r})")
    assert r.status is Status.ERROR and victim.exists()


def test_caught_violation_attempts_still_fail(sb1):
    sb = sb1
    # a program cannot swallow a forbidden call and carry on as OK
    r = sb.run("import os\ntry:\n    os.fork()\nexcept BaseException:\n    pass\nprint('ok')")
    assert r.status is Status.FORBIDDEN


def test_unreadable_leftovers_cleaned(sb1):
    sb = sb1
    r = sb.run("import os\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nos.chmod('d/f', 0)\n"
               "os.chmod('d', 0)\nprint('done')")
    assert r.ok
    assert sb.run("import os\nprint(os.listdir('.'))").stdout == "[]\n"


def test_short_thread_output_kept(sb):
    r = sb.run("import threading\nt = threading.Thread(target=lambda: print('from thread'))\n"
               "t.start()\nprint('main')")
    assert r.ok and sorted(r.stdout.splitlines()) == ["from thread", "main"]


# ----------------------------------------------------------------- reuse mode: clean state

# (name, program A, program B run next on the same server, B's expected stdout, what A
# does to a reuse-mode child: "taint" = the screen recycles it, "state" = the runtime
# fingerprint does, "reuse" = it is reused, and B must still see pristine state)
LEAKS: list[tuple[str, str, str, str, str]] = [
    ("module_attribute", "import math\nmath.pi = 3\nprint(math.pi)",
     "import math\nprint(math.pi)", "3.141592653589793\n", "taint"),
    ("sympy_attribute", "import sympy\nsympy.pi = 4", "import sympy\nprint(sympy.pi)", "pi\n",
     "taint"),
    ("class_attribute", "from fractions import Fraction\nFraction.limit = 7",
     "from fractions import Fraction\nprint(hasattr(Fraction, 'limit'))", "False\n", "taint"),
    ("class_method", "import sympy\nsympy.Rational.__str__ = lambda self: 'X'",
     "import sympy\nprint(sympy.Rational(1, 3))", "1/3\n", "taint"),
    ("builtins", "import builtins\nbuiltins.len = None\nbuiltins.answer = 42",
     "print(len('ab'), 'answer' in dir(__builtins__))", "2 False\n", "taint"),
    ("random_seed", "import random\nrandom.seed(0)",
     "import random\nprint(random.random() == 0.8444218515250481)", "False\n", "taint"),
    ("numpy_seed", "import numpy as np\nnp.random.seed(0)",
     "import numpy as np\nprint(np.random.rand() == 0.5488135039273248)", "False\n", "taint"),
    ("decimal_precision", "from decimal import getcontext\ngetcontext().prec = 5",
     "import decimal\nprint(decimal.getcontext().prec)", "28\n", "taint"),
    ("numpy_printoptions", "import numpy as np\nnp.set_printoptions(precision=2)",
     "import numpy as np\nprint(np.array([1 / 3]))", "[0.33333333]\n", "taint"),
    ("numpy_seterr", "import numpy as np\nnp.seterr(all='raise')",
     "import numpy as np\nprint(np.float64(1.0) / 0)", "inf\n", "taint"),
    ("warnings_filters", "import warnings\nwarnings.simplefilter('error')",
     "import warnings\nwarnings.warn('w')\nprint('ok')", "ok\n", "taint"),
    ("sys_path", "import sys\nsys.path.insert(0, '/nonexistent')",
     "import sys\nprint('/nonexistent' in sys.path)", "False\n", "taint"),
    ("environment", "import os\nos.environ['RSTAR_X'] = '1'",
     "import os\nprint('RSTAR_X' in os.environ)", "False\n", "taint"),
    ("signal_handler", "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)",
     "import signal\nprint(signal.getsignal(signal.SIGALRM) == signal.SIG_DFL)", "True\n",
     "taint"),
    ("sympy_evaluate", "from sympy.core.parameters import global_parameters as g\n"
     "g.evaluate = False", "import sympy\nx = sympy.Symbol('x')\nprint(x + x)", "2*x\n",
     "taint"),
    ("mpmath_precision", "from mpmath import mp\nmp.dps = 50", "from mpmath import mp\nprint(mp.dps)",
     "15\n", "taint"),
    ("new_import", "import wave\nprint('imported')",
     "import sys\nprint('wave' in sys.modules)", "False\n", "state"),
    # passes the static screen (the names are built at run time); the fingerprint sees it
    ("obfuscated_rebinding", "import sympy\nu = chr(95) * 2\nw = ''.join(['imp', 'ort'])\n"
     "sa = ''.join(['set', 'attr'])\n"
     "sympy.sympify(u + w + u + '(\"math\").' + u + sa + u + '(\"pi\", 3)')",
     "import math\nprint(math.pi)", "3.141592653589793\n", "state"),
    ("globals", "secret = 41\nclass K:\n    pass\ndef f():\n    return secret\nprint(f())",
     "print([n for n in ('secret', 'K', 'f') if n in dir()])", "[]\n", "reuse"),
    ("scratch_files", "import tempfile\nopen('a.txt', 'w').write('x')\n"
     "open(tempfile.gettempdir() + '/b.txt', 'w').write('y')\nprint(len('ok'))",
     "from pathlib import Path\nprint(sorted(p.name for p in Path('.').iterdir()))", "[]\n",
     "reuse"),
    ("random_advance", "import random\nrandom.random()\nrandom.shuffle([1, 2, 3])",
     "import random\nprint(random.getstate() == random.getstate())", "True\n", "reuse"),
]


@pytest.mark.parametrize("name,a,b,expected,effect", LEAKS, ids=[x[0] for x in LEAKS])
def test_state_does_not_leak(sb1, name, a, b, expected, effect):
    sb = sb1
    sb.run("print('warm')")  # the server has a child
    before = dict(sb.stats)
    workers = sb.worker_pids()
    ra = sb.run(a)
    assert ra.status in (Status.OK, Status.ERROR), ra
    rb = sb.run(b)
    assert rb.ok and rb.stdout == expected, (name, rb)
    if _strict(sb):
        assert sb.stats["children_forked"] - before.get("children_forked", 0) == 2
        return
    recycled = _recycled_since(sb, before)
    if effect == "reuse":  # (a child may still retire of age: CPU used or runs)
        assert set(recycled) <= AGE, recycled
        assert sb.worker_pids() == workers or recycled
    else:
        assert recycled.get(f"recycled_{effect}", 0) >= 1, recycled


AGE = {"recycled_cpu", "recycled_runs"}  # a child replaced for its age, not for a program


def _recycled_since(sb: Sandbox, before: dict[str, int]) -> dict[str, int]:
    return {k: sb.stats[k] - before.get(k, 0) for k in sb.stats
            if k.startswith("recycled_") and sb.stats[k] != before.get(k, 0)}


def test_reused_child_restores_rng_state(sb1):
    """Unseeded numpy draws are the same in every program (as in a fresh fork)."""
    sb = sb1
    prog = "import numpy as np\nprint(np.random.rand(), {i})"
    outs = [sb.run(prog.format(i=i)).stdout.split()[0] for i in range(3)]
    assert len(set(outs)) == 1
    if not _strict(sb):
        before, workers = dict(sb.stats), sb.worker_pids()
        sb.run(prog.format(i=3))
        recycled = _recycled_since(sb, before)  # advancing the RNG does not cost a fork
        assert set(recycled) <= AGE and (sb.worker_pids() == workers or recycled), recycled


def test_tainting_program_recycles_child():
    with Sandbox(SandboxConfig(workers=1, **{**LIGHT, "fresh_process_per_run": False})) as s:
        assert s.run("x = 1\nprint(x)").ok
        (w,) = s.worker_pids()
        assert s.run("y = 2\nprint(y)").ok and s.worker_pids() == [w]  # reused
        assert s.run("z = getattr(3, 'real')\nprint(z)").stdout == "3\n"
        assert s.worker_pids() == [] and s.stats["recycled_taint"] == 1
        assert s.recycle_details["taint: name getattr"] == 1
        assert s.run("print(4)").ok and s.stats["children_forked"] == 2


def test_ordinary_steps_do_not_taint():
    """The static screen passes typical rStar steps and the benchmark programs."""
    progs = typical_steps(440)
    progs += [textwrap.dedent(p) for p in (
        """
        from dataclasses import dataclass
        @dataclass
        class Point:
            x: float
            y: float
            def norm(self):
                return (self.x ** 2 + self.y ** 2) ** 0.5
        class Counter:
            def __init__(self):
                self.n = 0
            def add(self, k):
                self.n += k
                return self
            def __repr__(self):
                return f"Counter({self.n})"
        c = Counter().add(3)
        print(Point(3, 4).norm(), c)
        if __name__ == "__main__":
            print(repr(c))
        """,
        "import numpy as np\na = np.arange(12).reshape(3, 4)\na[0, 1] = 7\nprint(np.trace(a), "
        "np.stack([a, a]).shape)\nfor _ in range(2):\n    pass",
        "from sympy import *\nx, y = symbols('x y')\nprint(simplify((x**2 - y**2)/(x - y)), "
        "nsimplify(0.25), sympify('x**2 + 1'))",
        "import math, itertools, functools, collections, statistics, fractions, decimal, cmath\n"
        "print(math.isqrt(99), statistics.mean([1, 2]), decimal.Decimal('0.1') * 3, "
        "functools.reduce(lambda a, b: a * b, range(1, 6)), collections.Counter('aab'))",
    )]
    tainted = [(p, screen(compile(ast.parse(p), "<s>", "exec"))) for p in progs]
    assert [t for t in tainted if t[1] is not None] == []


TAINTING = [
    ("getattr(math, 'pi')", "name getattr"), ("import os", "name os"),
    ("import sys\nsys.setrecursionlimit(10)", "name sys"), ("x = [].__class__", "name __class__"),
    ("import math\nmath.tau = 1", "attribute store"), ("import math\ndel math.tau", "attribute delete"),
    ("class A:\n    def f(self, m):\n        m.x = 1", "attribute store"),
    ("def f(self):\n    self.x = 1\nimport math\nf(math)", "attribute store"),
    ("class A:\n    @staticmethod\n    def f(self):\n        self.x = 1", "attribute store"),
    ("import random\nrandom.seed(1)", "name seed"), ("from numpy.random import seed", "name seed"),
    ("import sympy\nsympy.init_printing()", "name init_printing"),
    ("import numpy as np\nnp.set_printoptions(precision=3)", "name set_printoptions"),
    ("from decimal import getcontext", "name getcontext"), ("import importlib.util", "name importlib"),
    ("import sympy\nsympy.sympify('__import__(\"os\")')", "dynamic string"),
    ("def f():\n    return eval('1')", "name eval"), ("import fractions\nfractions._gcd", "name _gcd"),
    ("import warnings\nwarnings.filterwarnings('ignore')", "name filterwarnings"),
]


@pytest.mark.parametrize("code,reason", TAINTING)
def test_screen_flags_tainting_programs(code, reason):
    assert screen(compile(ast.parse(code), "<s>", "exec")) == reason


def test_ordinary_steps_reuse_one_child(sb):
    """Typical steps (full preload and warm-up, as in production) run without a recycle."""
    if _strict(sb):
        pytest.skip("reuse mode only")
    progs = typical_steps(66)
    before = dict(sb.stats)
    res = [sb.run(p) for p in progs]
    assert all(r.ok for r in res), [r for r in res if not r.ok][:2]
    delta = {k: v - before.get(k, 0) for k, v in sb.stats.items() if v != before.get(k, 0)}
    assert set(_recycled_since(sb, before)) <= AGE, delta
    assert delta.get("children_forked", 0) <= 2 + delta.get("recycled", 0), delta


def test_cpu_limit_per_program_in_reuse_mode():
    """Each program gets its own CPU limit although RLIMIT_CPU counts the child's total:
    the server times each program, and the child is replaced once its total passes
    recycle_cpu_s, long before the kernel backstop (cpu_time_s + 1 s of its total)."""
    cfg = SandboxConfig(workers=1, timeout_s=6.0, cpu_time_s=1.0, recycle_cpu_s=0.5,
                        preload=("math",), warmup=False)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}:\n" \
           "    pass\nprint({i})"
    with Sandbox(cfg) as s:
        assert s.run(burn.format(s=0.4, i=1)).stdout == "1\n"
        assert s.stats["recycled"] == 0
        r = s.run(burn.format(s=0.7, i=2))  # same child: its total passes 1 s, still OK
        assert r.stdout == "2\n", r
        assert s.stats["recycled_cpu"] == 1 and s.stats["children_forked"] == 1
        r = s.run("while True: pass")
        assert r.status is Status.TIMEOUT and r.error == \
            "TimeoutError: execution exceeded the 1 s CPU-time limit"
        assert s.run("print('next')").stdout == "next\n"


def test_max_runs_per_child_and_stats():
    with Sandbox(SandboxConfig(workers=1, max_runs_per_child=3,
                               **{**LIGHT, "fresh_process_per_run": False})) as s:
        for i in range(7):
            assert s.run(f"print({i})").stdout == f"{i}\n"
        assert s.stats["runs"] == 7 and s.stats["children_forked"] == 3
        assert s.stats["recycled_runs"] == 2 and s.stats["recycled"] == 2
    with Sandbox(SandboxConfig(workers=1, **{**LIGHT, "fresh_process_per_run": True})) as s:
        for i in range(3):
            assert s.run(f"print({i})").ok
        assert s.stats["children_forked"] == 3 and s.stats["recycled_strict"] == 3
        assert s.worker_pids() == []


def test_config_validation():
    with pytest.raises(ValueError):
        SandboxConfig(recycle_cpu_s=0)
    with pytest.raises(ValueError):
        SandboxConfig(max_runs_per_child=0)


# ------------------------------------------------------------------------- pool lifecycle

def test_server_crash_is_restarted():
    with Sandbox(SandboxConfig(workers=1, **LIGHT)) as s:
        s.wait_ready(60)
        (pid,) = s.server_pids()
        fut = s.submit("import time\ntime.sleep(20)")
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        r = fut.result(30)
        assert r.status is Status.KILLED and "server died" in r.error
        assert s.run("print('again')").stdout == "again\n"
        (new_pid,) = s.server_pids()
        assert new_pid != pid and not _alive(pid)
        assert s.stats["restarts"] == 1


def test_close_leaves_no_processes():
    me = os.getpid()
    before = _descendants(me)
    s = Sandbox(SandboxConfig(workers=2, **LIGHT))
    s.wait_ready(60)
    assert s.run("print(1)").ok
    workers = s.worker_pids()  # reuse mode: the child that ran it waits for more
    assert len(workers) == (0 if STRICT else 1) and all(_alive(w) for w in workers)
    fut = s.submit("import time\ntime.sleep(30)")
    time.sleep(0.3)
    pids = s.server_pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    root = s._root
    s.close()
    assert fut.result(5).status is Status.KILLED
    assert _descendants(me) - before == set()
    assert not any(_alive(w) for w in workers)
    assert not os.path.exists(root)
    assert s.run("1").status is Status.KILLED  # closed pool answers, never hangs


def test_parent_death_kills_servers(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from rstar.sandbox import Sandbox, SandboxConfig
        s = Sandbox(SandboxConfig(workers=2, preload=("math",), warmup=False))
        s.wait_ready(60)
        fut = s.submit("import time\\ntime.sleep(60)")
        time.sleep(0.5)
        print(os.getpid(), *s.server_pids(), flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=90)
    parent, *pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    def left() -> list[int]:  # servers, or run children (forks of a server: same cmdline)
        found = []
        for pid in _proc_table():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"rstar.sandbox._server" in argv and str(parent).encode() in argv:
                found.append(pid)
        return found

    deadline = time.time() + 10
    while time.time() < deadline and (any(_alive(p) for p in pids) or left()):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert left() == []
