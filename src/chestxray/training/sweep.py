"""Hyper-parameter search with Optuna: seeded TPE sampling, median pruning on per-epoch validation loss.

Every trial is a :func:`chestxray.train.fit` run on the same train/validation split (the base
config's ``val_fraction`` and ``seed``, which the space should not change) in
``runs/<name>/trials/<n>`` (its logs: config, split, epoch metrics, curves). The objective is the
**validation loss** (cross-entropy of the best epoch, uncalibrated, minimised): less noisy than
accuracy on small validation sets. The trials train in memory (checkpoints in a temporary folder);
the best trial's model is kept and, once the search ends, calibrated and saved as its ``bundle/``.
``runs/<name>/trials.csv`` lists every trial (number, state, value, seconds, parameters, validation
accuracy and AUC, error) and ``best.yaml`` holds the best trial's full config under ``train:``, so
``chestxray train --config best.yaml`` retrains it.

A search space maps :class:`~chestxray.config.TrainConfig` keys to a list of choices or a range::

    space:
      arch: [tf_efficientnet_lite0, tf_efficientnet_lite2, resnet18]  # choices
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}                       # float range
      epochs: {low: 4, high: 16, step: 4}                              # int range (both ends integers)

In a YAML file it sits next to the base config, which then goes under ``train:``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from ..model.bundle import save_bundle
from .config import RuntimeSettings, TrainConfig
from ..errors import ChestXrayError, InputError
from ..storage import write_text
from ..launch import one_device
from ..stats.metrics import logit_scores
from ..model.runners import TorchRunner, run_images
from ..data.sources import Samples, load_samples
from .train import (MONITOR, bundle_meta, calibrate_on_validation, console, prepare_data, run_directory,
                    train_model)

__all__ = ["sweep", "SweepResult", "PruneTrial", "DEFAULT_SPACE", "default_space", "load_space", "check_space",
           "suggest", "trials_table"]

# Fast on a CPU and with ImageNet weights available offline. mobilenetv3_large_100 and resnet18 are
# fast too but need their weights downloaded (or weights: none): add them to the space to try them.
DEFAULT_SPACE: dict[str, Any] = {
    "arch": ["tf_efficientnet_lite0", "tf_efficientnet_lite2"],
    "lr": {"low": 1e-4, "high": 3e-3, "log": True},
    "batch_size": [16, 32, 64],
    "optimizer": ["adamw", "adam", "rmsprop", "sgd"],
    "image_size": [224, 256, 320],
    "augment": {"low": 0.0, "high": 1.5},
    "mixup": [0.0, 0.2, 0.4],
    "ema": [0.0, 0.95, 0.98],
    "fit_mode": ["pad", "crop"],
    "contrast": ["none", "clahe"],
    "epochs": {"low": 4, "high": 16, "step": 4},
}
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass
class SweepResult:
    """The finished study, every trial as a table, the best config and the best trial's bundle."""

    run_dir: Path
    best_config: TrainConfig
    best_value: float
    best_trial: int
    trials: pd.DataFrame
    study: optuna.Study
    bundle_dir: Path | None = None


class PruneTrial(Callback):
    """Report each epoch's validation loss (``train.MONITOR``) to an Optuna trial; raise ``TrialPruned``
    when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if value is None:
            return
        epoch = trainer.current_epoch + 1
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (validation loss {float(value):.4f})")


def default_space(base: TrainConfig) -> dict[str, Any]:
    """:data:`DEFAULT_SPACE`, without ``arch`` when the base config loads a weights file (it fits one architecture)."""
    if base.weights in ("imagenet", "none"):
        return dict(DEFAULT_SPACE)
    return {key: spec for key, spec in DEFAULT_SPACE.items() if key != "arch"}


def load_space(path: str | Path) -> dict[str, Any] | None:
    """The ``space:`` mapping of a YAML file, or ``None`` when it has none."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(path, f"cannot read the sweep file ({str(err).splitlines()[0]})") from None
    space = content.get("space") if isinstance(content, dict) else None
    if space is not None and not isinstance(space, dict):
        raise InputError(path, "space: must map config keys to a list of choices or a {low, high} range")
    return space


def check_space(space: Mapping[str, Any], base: TrainConfig) -> dict[str, Any]:
    """The space with numbers parsed; a one-line error for an unknown key or a choice/bound the config refuses."""
    known = {f.name for f in fields(TrainConfig)}
    checked: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in known:
            raise ChestXrayError(f"search space: unknown config key {key!r} (known: {', '.join(sorted(known))})")
        if key in ("data_format", "uncertain", "views", "raters"):
            raise ChestXrayError(f"search space: {key} says how DATA is read, which a sweep does once for all its "
                                 "trials; run one sweep per value")
        if isinstance(spec, list) and spec:
            values = spec
        elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec) <= RANGE_KEYS:
            spec = {**spec, "low": _number(spec["low"], key), "high": _number(spec["high"], key)}
            if not spec["low"] < spec["high"]:
                raise ChestXrayError(f"search space: {key} needs low < high, got {spec['low']} and {spec['high']}")
            values = [spec["low"], spec["high"]]
        else:
            raise ChestXrayError(f"search space: {key} must be a list of choices or a mapping with low and high "
                                 f"(optional log, step), not {spec!r}")
        for value in values:
            base.replace(**{key: value})  # raises the config's own error for a value it refuses
        checked[key] = spec
    return checked


def suggest(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """One value per key of a checked space: categorical for lists, int for integer ranges, float otherwise."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not isinstance(spec.get("step"), float):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                            log=bool(spec.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return values


def sweep(data: str | Path | Samples, base_config: TrainConfig | None = None, trials: int = 20,
          runtime: RuntimeSettings | None = None, *,
          out_dir: str | Path = "runs", name: str | None = None, timeout: float | None = None,
          cache_dir: str | Path | None = None, space: Mapping[str, Any] | None = None,
          pruner: optuna.pruners.BasePruner | None = None, overwrite: bool = False,
          progress: bool | None = None) -> SweepResult:
    """Search ``space`` (default :func:`default_space`) for the config with the lowest validation loss.

    Runs at most ``trials`` trials and stops starting new ones after ``timeout`` seconds. The
    default pruner is a median pruner that waits for 5 finished trials and the first unfrozen epoch.
    Trials that fail with a :class:`ChestXrayError` (e.g. weights that cannot be downloaded) or
    run out of GPU memory are recorded as failed and the search goes on.
    """
    base = base_config or TrainConfig()
    progress = console.is_terminal if progress is None else progress
    runtime = one_device(runtime or RuntimeSettings())  # trials train one after another in this process
    samples = data if isinstance(data, Samples) else load_samples(data, **base.source_options())  # fails once, not per trial
    space = check_space(space if space is not None else default_space(base), base)
    run_dir = run_directory(out_dir, name, prefix="sweep-", overwrite=overwrite, complete="best.yaml")
    trials_dir = run_dir / "trials"
    run_dir.mkdir(parents=True, exist_ok=True)

    best: dict[str, Any] = {}  # the best finished trial's model and data, saved as a bundle at the end

    def objective(trial: optuna.Trial) -> float:
        config = base.replace(**suggest(trial, space))
        try:
            prepared = prepare_data(samples, config, cache_dir=cache_dir, progress=progress)
            model, history = train_model(prepared, config, runtime, run_dir=trials_dir / str(trial.number),
                                         keep_checkpoints=False, progress=progress,
                                         callbacks=[PruneTrial(trial)])
        except (ChestXrayError, torch.OutOfMemoryError) as err:
            trial.set_user_attr("error", str(err).splitlines()[0] if str(err) else type(err).__name__)
            return math.nan  # optuna records the trial as failed and goes on
        images = np.asarray(prepared.cache.images)[prepared.val_rows]
        logits = run_images(TorchRunner(model), images)[0]
        scores = logit_scores(logits, prepared.targets[prepared.val_rows], prepared.samples.task)
        trial.set_user_attr("val_acc", scores.accuracy)
        trial.set_user_attr("val_auc", scores.macro_auc)
        if not best or scores.loss < best["loss"]:
            best.update(number=trial.number, loss=scores.loss, model=model, prepared=prepared, config=config,
                        history=history)
        return scores.loss

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials_table(study).to_csv(run_dir / "trials.csv", index=False)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            detail = f"validation loss {trial.value:.4f}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            detail = f"after epoch {trial.last_step}"
        else:
            detail = trial.user_attrs.get("error", "")
        console.print(f"trial {trial.number}: {trial.state.name.lower()} {detail}", soft_wrap=True)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial from after_trial instead
    try:
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=base.seed),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=base.freeze_epochs + 1))
        study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[after_trial])
    finally:
        optuna.logging.set_verbosity(verbosity)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
        raise ChestXrayError(f"no trial of the sweep {run_dir} finished"
                             + (f"; first error: {errors[0]}" if errors else " (all pruned or none started)"))
    winner = study.best_trial
    best_config = base.replace(**winner.params)
    bundle_dir = None
    if best.get("number") == winner.number:
        model, prepared = best["model"], best["prepared"]
        meta = bundle_meta(prepared, best["config"], calibrate_on_validation(model, prepared, best["config"].seed), best["history"])
        bundle_dir = save_bundle(trials_dir / str(winner.number) / "bundle", model, meta)
    write_text(run_dir / "best.yaml", yaml.safe_dump(  # last: a sweep folder without it was interrupted
        {"train": best_config.to_dict(),
         "sweep": {"trial": winner.number, "objective": "validation loss (min)", "value": winner.value,
                   "params": winner.params, "run_dir": str(trials_dir / str(winner.number))}}, sort_keys=False))
    return SweepResult(run_dir, best_config, float(winner.value), winner.number, trials_table(study), study,
                       bundle_dir)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, seconds, each parameter and the recorded attributes."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    frame = frame.rename(columns={"duration": "seconds"})
    return frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))


def _number(value: Any, key: str) -> int | float:
    """An int or float from YAML (which reads ``1e-4`` as a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ChestXrayError(f"search space: {key} bound {value!r} is not a number") from None
