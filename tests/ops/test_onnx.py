"""Fake quant exports to ONNX as QuantizeLinear -> DequantizeLinear and computes the same values in onnxruntime."""
import pytest
import torch

from hat import ops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.skipif(not ops.extension_status().loaded, reason="hat._C is not loaded")


class FakeQuants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("per_channel", torch.tensor([0.05, 0.1, 0.02, 0.04]))
        self.register_buffer("per_tensor", torch.tensor([2.0 ** -10]))

    def forward(self, x):
        y = ops.fake_quant(x, self.per_channel, 1, -128, 127)  # int8 per channel
        y = ops.lsq_fake_quant(y, self.per_channel * 3, 1, -128, 127)  # k / 3: never a .5 tie
        return ops.fake_quant(y, self.per_tensor, None, -32768, 32767)  # int16 per tensor


def test_fake_quant_exports_as_quantize_dequantize_pairs(tmp_path):
    from hat.ops.onnx import onnx_translations

    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(-140, 140, (2, 4, 5), generator=gen) + 0.3  # off the .5 ties, some beyond int8
    x = steps * torch.tensor([0.05, 0.1, 0.02, 0.04]).view(1, 4, 1)
    program = torch.onnx.export(FakeQuants().eval(), (x,), dynamo=True, custom_translation_table=onnx_translations(),
                                opset_version=21, verbose=False)
    program.save(str(tmp_path / "fq.onnx"))
    ops_used = [node.op_type for node in program.model_proto.graph.node]
    assert ops_used.count("QuantizeLinear") == 3 and ops_used.count("DequantizeLinear") == 3
    session = ort.InferenceSession(str(tmp_path / "fq.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), FakeQuants()(x), rtol=0, atol=1e-7)
