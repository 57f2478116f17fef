"""PRNG primitives → their values, computed at export time: a key that is a constant (flax's `nn.RNN` seeds the
carry initializer with `random.key(0)`; an nnx module in eval mode holds its `Rngs` keys as state) is evaluated
by JAX here and its result embedded, so the module needs no PRNG of its own. A key that depends on the inputs
cannot be exported: pass the random numbers in as an input instead.

Keys stay `core.Literal`s (there is no torch dtype for them); `random_bits` of a constant key becomes a buffer
where a rule asks for a tensor (`Emitter.t`). What follows the bits (shifts, bit casts) has all-constant inputs
and is evaluated the same way (`emitter.evaluate`).
"""

from __future__ import annotations

from jax._src import core

from trainkit.export.torchscript.emitter import CONSTANT_PRIMITIVES, NOT_CONSTANT, Emitter, Rule, Unsupported, evaluate


def _constant(g: Emitter, eqn: core.JaxprEqn, ins: list) -> list:
    if not all(isinstance(x, core.Literal) for x in ins):
        raise Unsupported(NOT_CONSTANT)
    return evaluate(eqn, ins)


RULES: dict[str, Rule] = dict.fromkeys(sorted(CONSTANT_PRIMITIVES), _constant)
