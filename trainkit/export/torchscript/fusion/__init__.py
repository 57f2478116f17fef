"""Fusions, a chain of equations → one native torch op: `graph` (what matchers read, and `plan`), `native`
(jax.nn and flax chains), `dense` (in place on a Dense's output), `attention`. The matchers run in the passes
listed in `registry.FUSION_PASSES` (importing this package registers nothing)."""
