"""Typical rStar-Math step programs, for the sandbox benchmark and tests.

rStar-Math executes, at every node of the search, the *whole* code of the partial solution
so far (steps 1..k joined). :func:`typical_steps` builds such programs from hand-written
solutions in the policy's format (``# Step k: ...`` comments, numbered steps, the last
one printing the answer), written after the paper's examples and the prompt in
``rstar/search/prompts.py``. We have no real policy traces here, so the mix is an estimate
and is documented rather than tuned:

* 22 solutions: 10 pure Python (arithmetic, loops, ``math``, ``fractions``, ``itertools``,
  a function, a small class), 9 with sympy (4 of them call ``solve``, the others
  ``Rational``/``sqrt``/``simplify``/``expand``/``factor``/``Eq``/``diff``), 3 with numpy.
* Every solution contributes each of its prefixes (3-5 steps), like a search that
  expands every step; coefficients vary with the index, so no two programs are equal
  (the sandbox cache never hits).

Resulting shares of programs (``typical_steps(440)``): about 40 % import sympy, about
18 % run ``sympy.solve``, about 12 % numpy, the rest plain Python.
"""

from __future__ import annotations

SOLUTIONS: tuple[tuple[str, ...], ...] = (
    # --- plain Python -----------------------------------------------------------------
    ("# Step 1: Compute the muffins sold in the morning\ntotal = {A}\n"
     "morning = total * 3 // 4\n",
     "# Step 2: Half of the remaining muffins are sold in the afternoon\n"
     "remaining = total - morning\nafternoon = remaining // 2\n",
     "# Now print the final answer\nprint(remaining - afternoon)\n"),
    ("# Step 1: Define the prices\nprice_pen = {b}\nprice_book = {c}\n",
     "# Step 2: Compute the total cost\ntotal_cost = {a} * price_pen + 3 * price_book\n",
     "# Step 3: Compute the change from a 100 dollar bill\nchange = 100 - total_cost\n",
     "# Now print the final answer\nprint(change)\n"),
    ("# Step 1: Count the multiples of 3 or 5 below the limit\nlimit = {A}\ncount = 0\n"
     "for n in range(1, limit):\n    if n % 3 == 0 or n % 5 == 0:\n        count += n\n",
     "# Step 2: Print the sum\nprint(count)\n"),
    ("# Step 1: Import math to count the committees of {b} out of {a2}\nimport math\n",
     "# Step 2: Choose {b} people out of {a2}\nways = math.comb({a2}, {b})\n",
     "# Step 3: Divide by the arrangements of the committee roles\n"
     "result = ways * math.factorial(2)\n",
     "# Now print the final answer\nprint(result)\n"),
    ("# Step 1: Define a function for the sum of divisors of {A}\ndef sum_divisors(n):\n"
     "    total = 0\n    for d in range(1, n + 1):\n        if n % d == 0:\n"
     "            total += d\n    return total\n",
     "# Step 2: Apply it to the number\nvalue = sum_divisors({A})\n",
     "# Now print the final answer\nprint(value)\n"),
    ("# Step 1: Use fractions for exact arithmetic\nfrom fractions import Fraction\n"
     "p = Fraction({b}, {c})\n",
     "# Step 2: Probability of the complement, twice\nq = (1 - p) ** 2\n",
     "# Step 3: Probability of at least one success\nanswer = 1 - q\n",
     "# Now print the final answer\nprint(answer)\n"),
    ("# Step 1: Enumerate pairs with itertools\nimport itertools\n"
     "numbers = list(range(1, {b2}))\n",
     "# Step 2: Count the pairs whose sum is divisible by 3\ncount = 0\n"
     "for x, y in itertools.combinations(numbers, 2):\n    if (x + y) % 3 == 0:\n"
     "        count += 1\n",
     "# Now print the final answer\nprint(count)\n"),
    ("# Step 1: Greatest common divisor and least common multiple\nimport math\n"
     "g = math.gcd({A}, {B})\n",
     "# Step 2: The lcm from the gcd\nl = {A} * {B} // g\n",
     "# Now print the final answer\nprint(g, l)\n"),
    ("# Step 1: A small class for the {b} by {c} rectangle\nclass Rectangle:\n"
     "    def __init__(self, width, height):\n        self.width = width\n"
     "        self.height = height\n\n    def area(self):\n"
     "        return self.width * self.height\n",
     "# Step 2: Build the rectangle and its diagonal\nimport math\n"
     "r = Rectangle({b}, {c})\ndiagonal = math.sqrt(r.width ** 2 + r.height ** 2)\n",
     "# Now print the final answer\nprint(r.area(), round(diagonal, 4))\n"),
    ("# Step 1: Compound interest\nprincipal = {A}\nrate = 0.0{b}\nyears = {c}\n",
     "# Step 2: Amount after the years\namount = principal * (1 + rate) ** years\n",
     "# Now print the final answer\nprint(f'{{amount:.2f}}')\n"),
    # --- sympy --------------------------------------------------------------------------
    ("# Step 1: Define the variable and the equation\n"
     "from sympy import symbols, Eq, solve\nx = symbols('x')\n"
     "equation = Eq(x**2 - {s}*x + {p}, 0)\n",
     "# Step 2: Solve the equation\nsolutions = solve(equation, x)\n",
     "# Step 3: Compute the positive difference of the solutions\n"
     "difference = abs(solutions[0] - solutions[1])\n",
     "# Now print the final answer\nprint(difference)\n"),
    ("# Step 1: Set up the linear equation\nfrom sympy import symbols, Eq, solve\n"
     "n = symbols('n')\neq = Eq({b} * n + {c}, {A})\n",
     "# Step 2: Solve for n\nsol = solve(eq, n)[0]\n",
     "# Now print the final answer\nprint(sol)\n"),
    ("# Step 1: Two equations in two unknowns\nfrom sympy import symbols, Eq, solve\n"
     "x, y = symbols('x y')\neq1 = Eq(x + y, {A})\neq2 = Eq(x - y, {b})\n",
     "# Step 2: Solve the system\nsol = solve((eq1, eq2), (x, y))\n",
     "# Step 3: The product of the two numbers\nproduct = sol[x] * sol[y]\n",
     "# Now print the final answer\nprint(product)\n"),
    ("# Step 1: Exact rational arithmetic\nfrom sympy import Rational\n"
     "r = Rational({b}, {c}) + Rational(1, {a})\n",
     "# Step 2: Reduce to lowest terms\nnum, den = r.p, r.q\n",
     "# Now print the final answer\nprint(num + den)\n"),
    ("# Step 1: Simplify the radical\nfrom sympy import sqrt, simplify\n"
     "expr = sqrt({sq})\n",
     "# Step 2: Simplify the expression\nsimplified = simplify(expr)\n",
     "# Now print the final answer\nprint(simplified)\n"),
    ("# Step 1: Expand the product\nfrom sympy import symbols, expand\nx = symbols('x')\n"
     "poly = expand((x + {b}) * (x - {c}))\n",
     "# Step 2: Read off the coefficient of x\ncoeff = poly.coeff(x, 1)\n",
     "# Now print the final answer\nprint(coeff)\n"),
    ("# Step 1: Factor the quadratic\nfrom sympy import symbols, factor\nx = symbols('x')\n"
     "f = factor(x**2 + {s}*x + {p})\n",
     "# Now print the final answer\nprint(f)\n"),
    ("# Step 1: Define the function\nimport sympy as sp\nt = sp.symbols('t')\n"
     "h = -{b} * t**2 + {A} * t\n",
     "# Step 2: The vertex from the derivative\nt_max = sp.solve(sp.diff(h, t), t)[0]\n",
     "# Step 3: Maximum height\nh_max = h.subs(t, t_max)\n",
     "# Now print the final answer\nprint(h_max)\n"),
    ("# Step 1: Evaluate the expression exactly\nfrom sympy import Rational, sqrt\n"
     "a = Rational({a}, {c})\nb = sqrt({sq2})\n",
     "# Step 2: Combine\nvalue = a * b + a\n",
     "# Now print the final answer\nprint(value)\n"),
    # --- numpy ----------------------------------------------------------------------------
    ("# Step 1: The scores as an array\nimport numpy as np\n"
     "scores = np.array([{b}, {c}, {a}, {b2}])\n",
     "# Step 2: Mean and standard deviation\nmean = scores.mean()\nstd = scores.std()\n",
     "# Now print the final answer\nprint(round(float(mean), 4), round(float(std), 4))\n"),
    ("# Step 1: Vectors\nimport numpy as np\nu = np.array([{b}, {c}, 1])\n"
     "v = np.array([1, {a}, {b}])\n",
     "# Step 2: Dot and cross products\ndot = int(np.dot(u, v))\ncross = np.cross(u, v)\n",
     "# Now print the final answer\nprint(dot, cross.tolist())\n"),
    ("# Step 1: Solve the linear system with numpy\nimport numpy as np\n"
     "A = np.array([[{b}, 1], [1, {c}]], dtype=float)\nrhs = np.array([{A}, {a}], dtype=float)\n",
     "# Step 2: Solve\nsol = np.linalg.solve(A, rhs)\n",
     "# Now print the final answer\nprint(np.round(sol, 4))\n"),
)


def _params(i: int) -> dict[str, int]:
    a, b, c = i % 11 + 2, i % 7 + 2, i % 5 + 3
    r1, r2 = i % 9 + 1, i % 6 + 2
    return {"a": a, "b": b, "c": c, "a2": a + 6, "b2": b + 6, "A": 20 + 3 * i % 80,
            "B": 12 + 5 * i % 60, "s": r1 + r2, "p": r1 * r2, "sq": 4 * (i % 17 + 2),
            "sq2": i % 13 + 2}


def typical_steps(n: int) -> list[str]:
    """``n`` distinct programs: every prefix of every solution, with varying numbers (a
    prefix equal to an earlier program is skipped; up to n = 440 none is)."""
    progs: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(progs) < n:
        steps = SOLUTIONS[i % len(SOLUTIONS)]
        p = _params(i)
        code = ""
        for step in steps:
            code += step.format(**p)
            if code not in seen:
                seen.add(code)
                progs.append(code)
                if len(progs) == n:
                    break
        i += 1
        if i > 1000 * len(SOLUTIONS):
            raise ValueError(f"cannot make {n} distinct programs")
    return progs
