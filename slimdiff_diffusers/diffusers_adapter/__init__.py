"""Everything of SlimDiff that imports diffusers: processors, model classes, pipelines, SlimSet."""
from .attention_processor import LowRankAttnProcessor, check_processors, processor_is_slim_aware
from .models import (
    SlimChromaTransformer2DModel,
    SlimCogView4Transformer2DModel,
    SlimDiTTransformer2DModel,
    SlimFluxTransformer2DModel,
    SlimHunyuanDiT2DModel,
    SlimLTXVideoTransformer3DModel,
    SlimPixArtTransformer2DModel,
    SlimQwenImageTransformer2DModel,
    SlimSD3Transformer2DModel,
    SlimUNet2DConditionModel,
    SlimUNet2DModel,
    SlimWanTransformer3DModel,
)
from .slimming import slim

__all__ = ["LowRankAttnProcessor", "SlimChromaTransformer2DModel", "SlimCogView4Transformer2DModel",
           "SlimDiTTransformer2DModel", "SlimFluxTransformer2DModel", "SlimHunyuanDiT2DModel",
           "SlimLTXVideoTransformer3DModel", "SlimPixArtTransformer2DModel", "SlimQwenImageTransformer2DModel",
           "SlimSD3Transformer2DModel", "SlimUNet2DConditionModel", "SlimUNet2DModel", "SlimWanTransformer3DModel",
           "check_processors", "processor_is_slim_aware", "slim"]
