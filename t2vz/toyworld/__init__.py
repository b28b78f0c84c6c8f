"""The toy world: a procedural world of captioned scenes (`world`), the judge that reads generated
images with the renderer's own knowledge (`judge`), and the training of the small SD-shaped model that ships with
t2vz as `model=toyworld` (`training`, run by experiments/train_toyworld.py)."""
