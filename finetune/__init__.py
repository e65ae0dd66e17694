"""finetune: from a recipe file to a verified, quantized model you can chat with, on one home GPU or a CPU."""

__version__ = "0.1.0"
