"""Flow-matching image and video models, one file per family as diffusers lays them out:

    sd3.py          Stable Diffusion 3 / 3.5
    flux.py         FLUX.1 and FLUX.1 Kontext (image editing)
    flux2.py        FLUX.2 [dev] and [klein]
    qwen_image.py   Qwen-Image
    wan.py          Wan 2.1 / 2.2 text-to-video (two experts, TI2V-5B) and image-to-video

``FlowModel.from_pretrained(path)`` opens any of them as the subclass its ``model_index.json`` names;
``base.py`` holds what they share.
"""

from diffrl.models.conditioning import Cond, PromptCache
from diffrl.models.flow.base import PIPELINES, FlowModel, detect_family
from diffrl.models.flow.flux import FluxKontextModel, FluxModel
from diffrl.models.flow.flux2 import Flux2Model
from diffrl.models.flow.qwen_image import QwenImageModel
from diffrl.models.flow.sd3 import SD3Model
from diffrl.models.flow.wan import WanI2VModel, WanModel

__all__ = ["PIPELINES", "Cond", "Flux2Model", "FlowModel", "FluxKontextModel", "FluxModel", "PromptCache",
           "QwenImageModel", "SD3Model", "WanI2VModel", "WanModel", "detect_family"]
