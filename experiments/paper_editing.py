"""The editing papers' comparison as one multirun: Video Instruct-Pix2Pix, Instruct-Pix2Pix frame by frame and
Tune-A-Video on (source video, source prompt, instruction, edited prompt) pairs, measured as Tune-A-Video (Wu et
al. 2023) measures editing: textual faithfulness and frame consistency by CLIP, plus the warp errors
(t2vz/experiment/editing_runs.py).

    .venv/bin/python experiments/paper_editing.py -m +experiment=paper_editing        # the toy world, every pair
    .venv/bin/python experiments/report.py multirun/DATE/TIME                        # the tables
    .venv/bin/python experiments/paper_editing.py method=tune_a_video pair=3 seed=1  # one job
    .venv/bin/python experiments/paper_editing.py -m +experiment=paper_editing pairs=pairs.yaml \\
        model=models/sd15 instruct_model=models/ip2p metrics.clip=models/clip-vit-large-patch14
    .venv/bin/python experiments/paper_editing.py --help

The sweep's keys: `method` (video_instruct_pix2pix, framewise_instruct_pix2pix, tune_a_video) is the setting;
`pair` (every index of the pairs) and `seed` are the replications. Without `pairs`, the toy world's eight pairs:
four toy source videos (an object moving over a still background, `toyworld.world.render_video`), two edits each
("make the circle blue", "put it on snow", "turn the square into a circle", ...), their edited prompts the edited
captions; Tune-A-Video runs on the shipped toy model, and the Instruct-Pix2Pix methods are skipped (the toy world
has no InstructPix2Pix model; `instruct_model=FOLDER` names one).

`model=` is Tune-A-Video's model (an SD 1.5 folder), `instruct_model=` the Instruct-Pix2Pix methods' (an
InstructPix2Pix folder, `python -m weights_convert instruct-pix2pix-00-22000.ckpt models/ip2p`); a method that
cannot run on them (no instruct_model, a UNet that is not an 8-channel InstructPix2Pix UNet, Tune-A-Video on SDXL)
is skipped: metrics.json says `"status": "skipped"` and `"error"`, the reason, and the sweep still exits 0.

The pairs file, `pairs=FILE`: a YAML list (.yaml, .yml) or JSON lines (.jsonl, .json; one object a line), each pair
with exactly these four keys (a relative `video` is read from the pairs file's folder; a video file or a folder of
frames, its first `num_frames` frames used):

    # pairs.yaml
    - video: videos/car-turn.mp4
      prompt: a jeep car is moving on the road
      instruction: turn the car into a Porsche
      edited_prompt: a Porsche car is moving on the road
    - video: videos/man-skiing.mp4
      prompt: a man is skiing
      instruction: make it Van Gogh's Starry Night style
      edited_prompt: a man is skiing, Van Gogh's Starry Night style

    # pairs.jsonl
    {"video": "videos/car-turn.mp4", "prompt": "a jeep", "instruction": "make it red", "edited_prompt": "a red jeep"}

The declared sweep covers every pair of the file (`pair: ${t2vz_pair_range:${pairs}}`); `pair=0,2` runs fewer.
Frames are resized so the long side is `resolution` (null: the Tune-A-Video model's size, 512 for SD 1.5), each
side a multiple of 64, and every method edits those same frames. Tune-A-Video's tuned weights are cached in
`cache_dir` per source video, prompt and seed, so the edits of one source share one tuning.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from t2vz.experiment.editing_runs import release_config_group, run_editing_job

release_config_group("method")  # `method` is this script's plain key, not t2vz's method config group


@hydra.main(version_base="1.3", config_path="../conf", config_name="paper_editing")
def main(cfg: DictConfig) -> float:
    return run_editing_job(cfg)


if __name__ == "__main__":
    main()
