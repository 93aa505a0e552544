"""STUB (being written): GPTQ / GPTAQ layer solvers. Public API:

gptq(W, H, *, bits, sym=False, mse=False, group_size=-1, act_order=False, static_groups=False,
     percdamp=0.01, blocksize=128, order="forward", name="layer") -> Tensor  (fake-quantized weight, float32)
gptaq(W, H, dXXT, *, alpha=0.25, exact=False, <same keywords>) -> Tensor
rtn(W, *, bits, sym=False, mse=False, group_size=-1) -> Tensor
gptq_quantize / gptaq_quantize / rtn_quantize(...same...) -> QuantResult(weight, codes, scales, zeros, g_idx, perm)
proxy_loss(W, Q, H, dXXT=None) -> float: ||(Q-W)X~||^2-type objective per token, and the asymmetric one when dXXT given.
"""
