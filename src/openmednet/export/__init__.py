"""Export: ONNX (checked against onnxruntime) and safetensors + model card."""

from openmednet.export.onnx import check_onnx, export_onnx
from openmednet.export.safetensors import export_safetensors

__all__ = ["check_onnx", "export_onnx", "export_safetensors"]
