"""Text2Video-Zero on the model of `t2vz.sd`: the sampling loop every pipeline shares (`sampling.py`),
text-to-image, `TextToVideoZero` (Algorithm 1, `text2video_zero.py`), motion and the latent warp, background
smoothing, long videos by chunks, `ControlVideo` (Sec. 3.4), `VideoInstructPix2Pix` (Sec. 3.5) and Canny edges.
docs/method.md maps the paper to these files."""
