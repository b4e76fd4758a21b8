"""moecc's own CPU kernels for ONNX Runtime: C sources built on first use (build.py), swapped into a session
when it loads (session.py): attention (attention.py) and mixture-of-experts layers (moe.py)."""

DOMAIN = "moecc"  # the kernels' custom-op domain
