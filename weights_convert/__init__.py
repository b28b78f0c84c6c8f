"""Convert the SD 1.x and SDXL base checkpoints people have into t2vz model folders (`t2vz/sd/model_folder.py`).

Usage::

    python -m weights_convert SRC OUT [--tokenizer DIR] [--dtype fp16|fp32] [--overwrite] [--allow-inpainting]
                                      [--no-ema]
    from weights_convert import convert; print(convert("v1-5-pruned-emaonly.safetensors", "models/sd15"))

The chosen layout
-----------------
t2vz's attribute names ARE the diffusers SD 1.5 keys (`down_blocks.0.resnets.0.norm1`, `attn1.to_q`, `to_out.0`;
VAE `encoder.mid_block.attentions.0.to_q` as a linear), and the text encoder is transformers' CLIPTextModel under
its canonical checkpoint keys `text_model.*`. So a diffusers folder converts by identity (`diffusers_folder.py`),
except that old diffusers VAEs call their attention `query/key/value/proj_attn` (→ `to_q/to_k/to_v/to_out.0`) and
CLIP's `position_ids` buffer is dropped (and the `text_model.` level added where transformers ≥ 5 left it out).

Single files (CompVis LDM layout, `ldm.py`) need one rename table and a few structural rules:

=============================  ===================================  =========================================
t2vz / diffusers               LDM                                  rule
=============================  ===================================  =========================================
conv_in                        model.diffusion_model.input_blocks.0.0
time_embedding.linear_1 / _2   time_embed.0 / time_embed.2
conv_norm_out / conv_out       out.0 / out.2
down_blocks.i.resnets.j        input_blocks.(1 + i(n+1) + j).0      n = layers_per_block
down_blocks.i.attentions.j     input_blocks.(1 + i(n+1) + j).1
down_blocks.i.downsamplers.0   input_blocks.((i+1)(n+1)).0.op       conv → op
mid_block.resnets.j / attn.0   middle_block.(2j) / middle_block.1
up_blocks.i.resnets.j          output_blocks.(i(n+1) + j).0         i = 0 is the lowest resolution
up_blocks.i.attentions.j       output_blocks.(i(n+1) + j).1
up_blocks.i.upsamplers.0       output_blocks.(i(n+1) + n).1 or .2   .2 where the level has attention
resnet norm1 conv1 norm2       in_layers.0 in_layers.2 out_layers.0
resnet conv2 time_emb_proj     out_layers.3 emb_layers.1
resnet conv_shortcut           skip_connection (UNet), nin_shortcut (VAE)
VAE (en|de)coder.conv_norm_out first_stage_model.(en|de)coder.norm_out
VAE encoder.down_blocks.i      encoder.down.i.block.j / .downsample
VAE decoder.up_blocks.i        decoder.up.(levels − 1 − i).block.j  levels reversed
VAE mid_block.resnets.0 / 1    mid.block_1 / mid.block_2
VAE mid_block.attentions.0     mid.attn_1: norm q k v proj_out      → group_norm to_q to_k to_v to_out.0;
                                                                    1×1 conv (c,c,1,1) → linear (c,c)
text_model.*                   cond_stage_model.transformer.[text_model.]*   older files lack text_model.
UNet weights with EMA          model_ema.diffusion_model + rest of the key without dots (preferred; --no-ema)
=============================  ===================================  =========================================

Configs are read off the shapes (UNet heads = 8, CLIP heads = hidden // 64). LDM's schedule buffers (`betas`,
`alphas_cumprod`, ...), `model_ema.decay/num_updates`, `position_ids` and the VAE's training losses
(`first_stage_model.loss.*`) are ignored by name; any other key that
is not used is an error, as is every missing key or wrong shape, all checked against t2vz's own model classes.
ControlNet checkpoints (`controlnet.py`: `control_model.*` single files, diffusers ControlNetModel folders) become
ControlNet folders (`t2vz.load_controlnet`).
SDXL base models (`sdxl.py`: SGM single files with `conditioner.embedders.0.transformer.*` CLIP ViT-L and
`conditioner.embedders.1.model.*` OpenCLIP ViT-bigG, whose OpenCLIP names map to CLIPTextModelWithProjection's;
diffusers folders with text_encoder_2/ and tokenizer_2/) become folders of family "sdxl" (heads = channels // 64
for a single file, the VAE's scaling factor 0.13025, the second tokenizer padding with "!").
Refused with a `ConversionError` saying why: SD 2.x, the SDXL refiner and SDXL inpainting (by name), SDXL
ControlNets, SD 1.x inpainting (unless --allow-inpainting), pickles that hold Python objects, truncated files.
"""
from weights_convert.checkpoint_io import ConversionError
from weights_convert.convert import Report, convert

__all__ = ["ConversionError", "Report", "convert"]
