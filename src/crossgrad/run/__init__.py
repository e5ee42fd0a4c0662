"""The runner: config schema, agent data, schedules, evaluation, checkpoints, run directories, cluster, trainer.

    from crossgrad.run import load_config, run_experiment
    result = run_experiment(load_config("my.toml"))
"""
from crossgrad.run.config import Config, ConfigError, load_config, user_errors
from crossgrad.run.rundir import RunBusyError, RunError
from crossgrad.run.trainer import RunResult, Trainer, resume_experiment, run_experiment

__all__ = [
    "Config", "ConfigError", "RunBusyError", "RunError", "RunResult", "Trainer", "load_config", "resume_experiment",
    "run_experiment", "user_errors",
]
