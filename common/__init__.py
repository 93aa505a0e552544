"""gptaq.common: quantizers, GPTQ/GPTAQ layer solvers, Hessian capture, data and evaluation.

The front ends (`fake_quant/`, `spinquant/`, `vit_quant/`) are thin argparse wrappers over this package.
"""
