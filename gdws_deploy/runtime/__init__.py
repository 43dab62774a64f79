"""What runs on the Jetson: engine build, runners, benchmark. Python 3.8, numpy + TensorRT.

Nothing here may import a host-only package (torch, onnx-graphsurgeon); `make lint`
checks the Python version floor with vermin.
"""
