"""steeldefect: transfer-learned, quantized CNN classifiers for steel surface defects."""

__version__ = "0.1.0"
