"""Models with the layer exported to ONNX: ``torch.onnx.export``'s exporter (torch.export, then
every operator translated to ONNX; torch's default since 2.9) and the older TorchScript one.

The exporter has no translation for the kernels' custom operators, so an export failed
("Failed to convert the exported program to an ONNX model"); while it traces, the layer takes
the composed torch ops, which translate, as under ``torch.jit.trace``.

Oracle: the eager layer's output, against the exported file run by onnx's reference runtime
(``onnx.reference.ReferenceEvaluator``, plain NumPy), on another batch than the traced one.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from batchnorm import BatchNormalization


def _conv_model() -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormalization(8, axis=1), nn.ReLU())
    return model, (4, 3, 10, 10)


def _channels_last_model() -> tuple[nn.Module, tuple[int, ...]]:
    # Keras' axis=-1 on NLC data, Batch Renormalization, no beta, a fused activation.
    layer = BatchNormalization(6, renorm=True, center=False, activation="relu")
    return nn.Sequential(layer), (4, 7, 6)


def _exported(model: nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        # the exporters' own notices (deprecations of torch's, onnxscript's)
        warnings.simplefilter("ignore")
        if exporter == "torch.export":
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            assert program is not None
            return program.model_proto
        file = io.BytesIO()
        torch.onnx.export(model, (x,), file, dynamo=False)
        return onnx.load_from_string(file.getvalue())


@pytest.mark.parametrize("exporter", ["torch.export", "torchscript"])
@pytest.mark.parametrize("make", [_conv_model, _channels_last_model])
def test_an_exported_model_computes_the_eager_inference(make, exporter):
    torch.manual_seed(0)
    model, shape = make()
    model.train()
    for _ in range(3):  # moving statistics away from their initial values
        model(torch.randn(shape) * 3 + 2)
    model.eval()
    traced, other = torch.randn(shape) * 3 + 2, torch.randn(shape) * 3 + 2
    buffers = [b.clone() for b in model.buffers()]
    proto = _exported(model, traced, exporter)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node), [
        (node.domain, node.op_type) for node in proto.graph.node
    ]
    run = ReferenceEvaluator(proto)
    with torch.no_grad():
        expected = model(other).numpy()
    (result,) = run.run(None, {proto.graph.input[0].name: other.numpy()})
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
