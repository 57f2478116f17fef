"""trainkit: config-driven sharded training for JAX/Flax with Orbax checkpoints and standalone exports.

Importing `trainkit` itself imports nothing heavy (no JAX), so `trainkit.ase` works with torch + ase only.
"""

__version__ = "0.1.0"
