"""4-bit and 8-bit base weights in bitsandbytes' format, without needing bitsandbytes to read them.

`formats` holds the 4-bit layout (NF4/FP4 codes, blockwise absmax, double-quantized statistics),
our dequantizer and a quantizer that writes the same bytes as bitsandbytes; `bnb` is the thin,
optional bridge to bitsandbytes' modules (`Linear4bit`, `Linear8bitLt`); `kbit` prepares a
quantized model for training as HF peft's `prepare_model_for_kbit_training` does.
"""

from .formats import QuantState4bit, dequantize_4bit, quantize_4bit
from .kbit import prepare_model_for_kbit_training

__all__ = ["QuantState4bit", "dequantize_4bit", "prepare_model_for_kbit_training", "quantize_4bit"]
