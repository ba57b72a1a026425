"""prompt2prompt: look inside Stable Diffusion's attention and edit images by controlling it."""

from .attend import AttendResult, attend
from .attention import AttentionController, Controllers, LayerInfo, Site, control
from .errors import InputError, ModelError, P2PError, PromptError
from .generation import Generation, GenerationOptions, generate
from .loading import load_pipeline
from .maps import CrossAttentionMaps, HeatMap, SelfAttentionMaps
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens
from .trace import Trace, trace

__all__ = [
    "AttendResult", "AttentionController", "AttentionStore", "Controllers", "CrossAttentionMaps", "Generation",
    "GenerationOptions", "HeatMap", "InputError", "LayerInfo", "ModelError", "P2PError", "PromptError",
    "PromptTokens", "RecordOptions", "SelfAttentionMaps", "Site", "Trace", "attend", "control", "generate",
    "load_pipeline", "trace",
]

__version__ = "0.1.0"
