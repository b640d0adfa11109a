"""The Qwen2.5-VL family (checkpoints with `model_type = "qwen2_5_vl"`)."""
from .model import Qwen2_5_VL

__all__ = ["Qwen2_5_VL"]
