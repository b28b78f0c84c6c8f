"""t2vz: Text2Video-Zero (Khachatryan et al., ICCV 2023) on a hand-written Stable Diffusion 1.5 in plain PyTorch.

    import t2vz
    sd = t2vz.load("models/sd15")                 # a folder written by `python -m weights_convert`
    image = t2vz.text_to_image(sd, "a photo of a cat", generator=torch.Generator().manual_seed(0))
"""
from .attention import CrossFrame
from .canny import canny_edges
from .controlnet import ControlNet, ControlNetConfig
from .controlvideo import ControlVideo
from .instruct import VideoInstructPix2Pix
from .loading import StableDiffusion, load, load_controlnet
from .model_folder import ModelFolderError
from .pipeline import TextToVideoZero
from .text_to_image import text_to_image
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__version__ = "0.1.0"
__all__ = [
    "AutoencoderKL", "ControlNet", "ControlNetConfig", "ControlVideo", "CrossFrame", "ModelFolderError",
    "StableDiffusion", "TextToVideoZero", "UNet", "UNetConfig", "VAEConfig", "VideoInstructPix2Pix", "load",
    "canny_edges", "load_controlnet", "text_to_image", "__version__",
]
