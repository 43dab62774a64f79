"""Multi-exit models on the host: split into stages, calibrate exit thresholds, benchmark.

The device side (the staged runtime and its exit gate) is gdws_deploy/runtime/staged.py.
"""
