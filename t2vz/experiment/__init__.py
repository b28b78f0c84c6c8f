"""The experiment machinery around the method: the Hydra configs and jobs of `t2vz` / `python -m t2vz` and the
entry points in experiments/ (`config.py`, `run.py`, `conditional_runs.py`), Weights & Biases tracking, the
metrics, the multirun reports, benchmark helpers and the `t2vz-text-to-image` command (`cli.py`)."""
