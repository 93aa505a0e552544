"""common.models: model adapters (decoder LLMs, timm ViTs), rotations and the KV cache."""
