"""moecc's own CPU kernels for ONNX Runtime: C sources built on first use (build.py), swapped into a session
when it loads (attention.py)."""
