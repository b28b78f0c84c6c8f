"""The Stable Diffusion 1.5 model, written by hand: attention (with cross-frame attention as a mode of `attn1`),
ResNet blocks, the UNet, the KL autoencoder, the CLIP text encoder wrapper, ControlNet, the DDIM and DDPM
schedulers (`schedulers/`), and the on-disk model folder with `load`. Attribute names equal the checkpoint keys
(diffusers' layout). Imports nothing from the rest of t2vz."""
