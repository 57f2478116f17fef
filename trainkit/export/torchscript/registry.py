"""The converter's one translation table: every primitive name → its rule, and the fusion matchers in order.

`RULES` is what `Emitter.eqn` dispatches every equation through (calls, custom_jvp and control flow included), and
what `Emitter.check_supported` reads before anything is translated; `plan_fusions` picks the chains of equations
that become one native torch op. Both are built here from explicit lists: importing a rule module registers
nothing, and a primitive with rules in two modules fails at import (`emitter.rule_table`).

Layers, each importing only those below it (tests/test_torchscript_registry.py checks the import graph):
    api        to_torchscript: generate, script
    checks     parity, call_repeatedly: check against JAX, call after call
    tracing    the jaxpr: symbolic dims, dim_constraints, JAX's derivative for with_forces
    registry   this table
    fusion/    a chain of equations → one native torch op (graph, native, dense, attention)
    rules/     one equation → torch code (elementwise, shapes, contraction, indexing, calls, control_flow,
               random: constant keys evaluated at export; hops: control flow for torch.export)
    emitter    Emitter, Value, Unsupported and the code-text helpers; knows no primitive

How to add
- a primitive: write `_name(g: Emitter, eqn, ins) -> [expression per output]` in the rules module of its kind
  (`g.t(x)` is an input as a tensor, `g.s(x)` as a Python scalar where torch takes one; raise
  `Unsupported("with ... is not supported")` for parameters it cannot express) and add `"name": _name` to that
  module's `RULES`. Test its values and gradients against JAX in tests/test_torchscript_ops.py. (A new rules
  module: list its `RULES` in `RULES` below.)
- a control-flow or call form: the same, in rules/control_flow.py or rules/calls.py. Translate sub-jaxprs with
  `g.run_closed(jaxpr, args)` inside `g.block("header:")` and `g.inside("what")` (error messages name it), and
  return names that every path assigns (`g.materialize`).
- a fusion: write `match_x(graph, root) -> (inputs, chain, emit) | None` in fusion/ (`root` is the chain's last
  equation, `emit(g, input codes)` returns the expression of its output) and add it to `FUSION_PASSES` under the
  root's primitive: in the first pass if its chain contains another fusion's chain (attention contains a softmax),
  else in the second. A chain is fused only where its intermediate values are used nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from jax._src import core

from trainkit.export.torchscript.emitter import Fusion, Rule, rule_table
from trainkit.export.torchscript.fusion import attention, dense, native
from trainkit.export.torchscript.fusion.graph import Matcher, plan
from trainkit.export.torchscript.rules import (calls, contraction, control_flow, elementwise, hops, indexing, random,
                                              shapes)

RULES: Mapping[str, Rule] = MappingProxyType(rule_table(
    elementwise.RULES, shapes.RULES, contraction.RULES, indexing.RULES, calls.RULES, control_flow.RULES,
    random.RULES))

# torch.export's table (`.pt2`, AOTInductor): the same, with control flow as torch's higher-order ops.
EXPORT_RULES: Mapping[str, Rule] = MappingProxyType({**RULES, **hops.RULES})
assert set(hops.RULES) <= set(RULES)

FUSION_PASSES: tuple[Mapping[str, tuple[Matcher, ...]], ...] = (
    {  # chains that contain other matchers' chains: attention a softmax, the in-place ones a Dense
        "custom_jvp_call": (native.match_conv_relu, dense.dense_relu),
        "dot_general": (attention.match_attention,),
        "mul": (dense.dense_activation,),
        "pjit": (dense.dense_jitted_silu,),
        "jit": (dense.dense_jitted_silu,),
        "add": (dense.dense_residual,),
    },
    {
        "mul": (native.match_gelu_tanh, native.match_gelu_erf, native.match_silu),
        "div": (native.match_softmax,),
        "sub": (native.match_log_softmax,),
        "add": (native.match_layer_norm, native.match_dense, native.match_conv_bias),
    },
)


def plan_fusions(jaxpr: core.Jaxpr) -> dict[int, Fusion]:
    """The fusions of `jaxpr` (by `FUSION_PASSES`), keyed by the index of their root equation."""
    return plan(jaxpr, FUSION_PASSES)
