"""moecc's own CPU kernels for ONNX Runtime: C sources built on first use (build.py), swapped into a session
when it loads (session.py): attention (attention.py) and mixture-of-experts layers (moe.py)."""

import onnx

DOMAIN = "moecc"  # the kernels' custom-op domain


def attribute_value(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or `default` where the node does not set it."""
    return next((onnx.helper.get_attribute_value(attribute) for attribute in node.attribute if attribute.name == name), default)
