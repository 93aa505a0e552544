"""The model-level Python API (`common.api.llm`) and the configuration objects it takes."""
from common.api.llm import CausalLM, export_saved, quantize_streamed
from common.models.kv_quant import KVQuantConfig
from common.models.rotation import Rotation
from common.quant.act_quant import ActQuantSettings
from common.solver import GPTAQConfig, SolverConfig

__all__ = ["CausalLM", "quantize_streamed", "export_saved", "SolverConfig", "GPTAQConfig", "ActQuantSettings",
           "KVQuantConfig", "Rotation"]
