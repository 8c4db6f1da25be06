"""dtplan IR: capture a model as an ATen fx graph and lift it into frozen nodes."""
from dtplan.ir.capture import CaptureError, Captured, capture, capture_training, fake_build, lift
from dtplan.ir.graph import Graph, Node, Ref, Role, TensorMeta, dtype_name

__all__ = ["CaptureError", "Captured", "Graph", "Node", "Ref", "Role", "TensorMeta", "capture", "capture_training", "dtype_name", "fake_build", "lift"]
