"""Opt-in `torch.compile` of a model's networks: inductor, weights frozen for inference.

Off by default (docs/engine.md, levers): compiling takes tens of seconds per batch size the
job uses, and fused kernels round differently from eager PyTorch, so labels can differ from
nnU-Net's where two classes are within float rounding of a tie.
"""

from __future__ import annotations

import torch

from ..errors import CryoMambaError

__all__ = ["CompileError", "CompiledNetwork"]


class CompileError(CryoMambaError):
    code = "compile_failed"


class CompiledNetwork:
    """A network through `torch.compile` (static shapes: one graph per batch size, compiled at
    its first call); a failure to compile is a `CompileError` with a hint, not a traceback."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        # freezing folds the weights into the graph, which lets oneDNN pre-pack them
        self._fn = torch.compile(network, dynamic=False, options={"freezing": True})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch._dynamo.exc as dynamo_exc

        try:
            out: torch.Tensor = self._fn(x)
        except dynamo_exc.TorchDynamoException as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CompileError(
                f"torch.compile could not compile the network: {first[:300]}",
                hint="run without compile (the default); on a CPU torch.compile needs a "
                "working C++ compiler (g++ or $CXX)",
            ) from None
        return out
