"""A sweep trial's name and config, the same for ASHA's trials and PBT's."""
from ray import tune

from pipeline.config import Config, apply_override, config_from_dict, config_to_dict

METRIC = "val_ap"
# A random-search trial's index in the sweep's plan, beside the searched keys.
TRIAL = "trial"


def trial_name(base_name: str, params: dict, trial_id: str) -> str:
    """A trial's run name: by its index in a random search's plan (so a rerun resumes its
    checkpoints), by Tune's trial id in an optuna search."""
    return f"{base_name}-{TRIAL}{params[TRIAL]}" if TRIAL in params else f"{base_name}-{trial_id}"


def trial_config(base: dict, params: dict) -> Config:
    """The base config with a trial's sampled values, validating every report for the scheduler."""
    data = config_to_dict(config_from_dict(base))
    for key, value in params.items():
        if key != TRIAL:
            apply_override(data, key, value)
    data["run"]["name"] = trial_name(data["run"]["name"], params, tune.get_context().get_trial_id())
    data["train"]["checkpoint_every"] = data["train"]["eval_every"]  # every report carries val_ap
    data["tune"]["space"] = {}
    return config_from_dict(data)
