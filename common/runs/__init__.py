"""common.runs: the whole-model pipelines behind the front ends (LLM: QuaRot/SpinQuant + GPTQ/GPTAQ; ViT)."""
