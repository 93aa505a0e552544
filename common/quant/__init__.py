"""common.quant: quantization grids and quantizers."""
