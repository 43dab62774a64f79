"""Static INT8 quantization: a float model and calibration samples in, a QDQ model out.

Not a CompressionPass: it rewrites no Conv into another form, it quantizes every tensor of
whatever model a pass wrote. The pipeline runs it after any pass (ConvertOptions.int8), or
alone (method "int8", QUANTIZE_ONLY).
"""

# --method int8: no pass, quantization only.
QUANTIZE_ONLY = "int8"
# Samples static calibration draws by default: MinMax ranges settle well before this.
DEFAULT_CALIB_LIMIT = 256
