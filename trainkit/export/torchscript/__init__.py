"""Export any JAX function to a standalone TorchScript module (no JAX, no trainkit needed to run it).

    module = to_torchscript(lambda p, x: model.apply(p, x), params, (x,), "model.pt",
                            dynamic_axes=[{0: "batch"}])

The function is traced to a jaxpr with symbolic dimensions (`jax.export.symbolic_shape`), so the module accepts
other sizes along the dynamic axes; the jaxpr is translated equation by equation into the source of an
`nn.Module.forward` that `torch.jit.script` compiles, with the parameters as buffers. Gradients flow through
the module (custom_jvp rules included), and `with_forces=True` bakes JAX's own `-d(output0)/d(input0)` (its
derivative's jaxpr, translated) into `forward`. Every export is checked against JAX, several calls each, on
the example inputs and a second size (`parity`).

The same translation, emitted for `torch.export` (control flow as torch's higher-order ops), gives a `.pt2`
program or, compiled by AOTInductor, a package of fused C++ kernels: `to_torch_export` (`program`).

Layout: `api` (to_torchscript), `program` (to_torch_export), `tracing` (jaxpr, dynamic axes, JAX's
derivative), `checks` (parity, call_repeatedly), `registry` (the one table of translations and fusions, and how
to add to it), `rules/`, `fusion/`, `emitter`; see `registry`'s docstring.
"""

from trainkit.export.torchscript.api import DynamicAxes, to_torchscript
from trainkit.export.torchscript.checks import PARITY_TOLERANCE, call_repeatedly, parity
from trainkit.export.torchscript.program import TorchExport, to_torch_export

__all__ = ["PARITY_TOLERANCE", "DynamicAxes", "TorchExport", "call_repeatedly", "parity", "to_torch_export",
           "to_torchscript"]
