"""Self-evolution: the nano world (synthetic problems and a CPU-sized policy) and, later, the
rounds that drive search -> fine-tune -> PPM. Heavy imports (torch) stay inside rstar.evolve.nano."""

from rstar.evolve.world import World, WorldConfig, difficulty_of, reference_solution, reference_steps

__all__ = ["World", "WorldConfig", "difficulty_of", "reference_solution", "reference_steps"]
