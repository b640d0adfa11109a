"""The Qwen3-VL family (checkpoints with `model_type = "qwen3_vl"` or `"qwen3_vl_moe"`)."""
from .model import Qwen3_VL

__all__ = ["Qwen3_VL"]
