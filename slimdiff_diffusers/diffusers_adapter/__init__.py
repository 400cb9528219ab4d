"""Everything of SlimDiff that imports diffusers: processors, model classes, pipelines, SlimSet."""
from .attention_processor import LowRankAttnProcessor, check_processors, processor_is_slim_aware
from .models import (
    SlimChromaTransformer2DModel,
    SlimDiTTransformer2DModel,
    SlimFluxTransformer2DModel,
    SlimPixArtTransformer2DModel,
    SlimSD3Transformer2DModel,
    SlimUNet2DConditionModel,
    SlimUNet2DModel,
)
from .slimming import slim

__all__ = ["LowRankAttnProcessor", "SlimChromaTransformer2DModel", "SlimDiTTransformer2DModel",
           "SlimFluxTransformer2DModel", "SlimPixArtTransformer2DModel", "SlimSD3Transformer2DModel",
           "SlimUNet2DConditionModel", "SlimUNet2DModel", "check_processors", "processor_is_slim_aware", "slim"]
