"""The LLaVA-OneVision family (checkpoints with `model_type = "llava_onevision"`)."""
from .model import LlavaOneVision

__all__ = ["LlavaOneVision"]
