"""prompt2prompt: look inside Stable Diffusion's attention and edit images by controlling it.

    import prompt2prompt as p2p

    pipe = p2p.load_pipeline("shapes")                         # or a diffusers folder, or a cached hub id
    maps = p2p.attend(pipe, "a red circle and a blue square").maps()
    r = p2p.edit(pipe, "a red circle and a blue square", "a red circle and a blue triangle",
                 p2p.EditOptions(blend=("square", "triangle")))
    with p2p.trace(pipe) as tc:                                # or trace your own pipeline call
        pipe("a red circle")
"""

from .analysis import SwapAnalysis, swap_analysis
from .attend import AttendResult, attend
from .attention import AttentionController, Controllers, LayerInfo, Site, control
from .concepts import ConceptMaps, ConceptOptions, ImageConcepts, image_concepts
from .edits import EditOptions, EditResult, edit
from .errors import InputError, ModelError, P2PError, PromptError
from .flowedit import FlowEditOptions, FlowEditResult, flowedit
from .generation import Generation, GenerationOptions, generate
from .inversion import Inversion, InversionOptions, invert, sample_back
from .loading import load_pipeline
from .maps import CrossAttentionMaps, HeatMap, SelfAttentionMaps
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens
from .trace import Trace, trace

__all__ = [
    "AttendResult", "AttentionController", "AttentionStore", "ConceptMaps", "ConceptOptions", "Controllers",
    "CrossAttentionMaps", "EditOptions", "EditResult", "FlowEditOptions", "FlowEditResult", "Generation",
    "GenerationOptions", "HeatMap", "ImageConcepts", "InputError", "Inversion", "InversionOptions", "LayerInfo",
    "ModelError", "P2PError", "PromptError", "PromptTokens", "RecordOptions", "SelfAttentionMaps", "Site",
    "SwapAnalysis", "Trace", "attend", "control", "edit", "flowedit", "generate", "image_concepts", "invert",
    "load_pipeline", "sample_back", "swap_analysis", "trace",
]

__version__ = "0.1.0"
