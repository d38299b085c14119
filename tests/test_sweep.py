"""Hyper-parameter sweep: trials table, reusable best config, pruning, failures and the search space."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from factories import TINY, write_xrays

from chestxray.model.bundle import load_bundle
from chestxray.training.config import TrainConfig, load_config
from chestxray.errors import ChestXrayError
from chestxray.training.sweep import DEFAULT_SPACE, check_space, default_space, load_space, suggest, sweep

SPACE = {"lr": {"low": "1e-4", "high": 1e-2, "log": True}, "optimizer": ["adam", "sgd"]}


class PruneAfterFirstTrial(optuna.pruners.BasePruner):
    """Prunes every trial but the first at its first report."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number > 0


@pytest.mark.slow
def test_sweep_writes_trials_and_a_reusable_best_config(tmp_path: Path) -> None:
    data = write_xrays(tmp_path / "data", patients=4)
    base = TrainConfig(**TINY)
    result = sweep(data, base, trials=3, out_dir=tmp_path / "runs", name="s", space=SPACE, progress=False)
    run = tmp_path / "runs" / "s"
    trials = pd.read_csv(run / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2] and set(trials["state"]) == {"COMPLETE"}
    assert {"value", "seconds", "lr", "optimizer", "val_acc"} <= set(trials.columns)
    assert trials["value"].notna().all() and (trials["seconds"] > 0).all()
    best = trials.loc[trials["value"].idxmin()]
    assert result.best_trial == best["number"] and result.best_value == pytest.approx(best["value"])
    config = load_config(run / "best.yaml")
    assert config == base.replace(lr=best["lr"], optimizer=best["optimizer"]) == result.best_config
    for number in range(3):
        trial_dir = run / "trials" / str(number)
        assert (trial_dir / "metrics.csv").is_file()
        assert (trial_dir / "bundle").is_dir() == (number == result.best_trial), "only the best trial is saved"
        assert not (trial_dir / "checkpoints").exists(), "trials train in memory"
    assert result.bundle_dir == run / "trials" / str(result.best_trial) / "bundle"
    meta = load_bundle(result.bundle_dir)[1]
    assert meta.metrics["val_loss"] == pytest.approx(result.best_value) and meta.extra["config"]["lr"] == best["lr"]


@pytest.mark.slow
def test_pruned_trials_stop_early(tmp_path: Path) -> None:
    data = write_xrays(tmp_path / "data", patients=4)
    base = TrainConfig(**{**TINY, "epochs": 2})
    result = sweep(data, base, trials=2, out_dir=tmp_path / "runs", name="p", space={"optimizer": ["adam", "sgd"]},
                   pruner=PruneAfterFirstTrial(), progress=False)
    trials = pd.read_csv(tmp_path / "runs" / "p" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "PRUNED"] and result.best_trial == 0
    pruned = tmp_path / "runs" / "p" / "trials" / "1"
    assert len(pd.read_csv(pruned / "metrics.csv")) == 1, "the pruned trial should stop after its first epoch"
    assert len(pd.read_csv(tmp_path / "runs" / "p" / "trials" / "0" / "metrics.csv")) == 2
    assert not (pruned / "checkpoints").exists() and not (pruned / "bundle").exists()


@pytest.mark.slow
def test_sweep_where_every_trial_fails_names_the_error(tmp_path: Path) -> None:
    data = write_xrays(tmp_path / "data", patients=2)
    with pytest.raises(ChestXrayError, match="no trial .* finished; first error: unknown architecture 'nonet'"):
        sweep(data, TrainConfig(**TINY), trials=2, out_dir=tmp_path / "runs", space={"arch": ["nonet"]},
              progress=False)
    trials = pd.read_csv(next((tmp_path / "runs").iterdir()) / "trials.csv")
    assert list(trials["state"]) == ["FAIL", "FAIL"]


def test_space_from_yaml_next_to_the_base_config(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  epochs: 3\nspace:\n  lr: {low: 1e-4, high: 1e-2, log: true}\n"
                    "  epochs: {low: 2, high: 6, step: 2}\n  hflip: [true, false]\n")
    assert load_config(path).epochs == 3
    space = check_space(load_space(path), load_config(path))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        values = suggest(study.ask(), space)
        assert 1e-4 <= values["lr"] <= 1e-2 and values["epochs"] in (2, 4, 6) and isinstance(values["hflip"], bool)
    assert load_space(tmp_path / "sweep.yaml") is not None
    path.write_text("epochs: 3\n")
    assert load_space(path) is None


@pytest.mark.parametrize(("space", "message"), [
    ({"learning_rate": [0.1]}, "unknown config key 'learning_rate'"),
    ({"devices": ["1", "2"]}, "unknown config key 'devices'"),  # hardware is not a hyper-parameter
    ({"optimizer": ["adam", "lbfgs"]}, "optimizer must be one of"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "lr needs low < high"),
    ({"lr": {"low": "small", "high": 1e-2}}, "lr bound 'small' is not a number"),
    ({"lr": 0.1}, "lr must be a list of choices or a mapping with low and high"),
    ({"uncertain": ["ones", "zeros"]}, "uncertain says how DATA is read, which a sweep does once"),
])
def test_bad_space_is_a_clear_error(space: dict, message: str) -> None:
    with pytest.raises(ChestXrayError, match=message):
        check_space(space, TrainConfig())


def test_default_space_samples_valid_offline_configs() -> None:
    base = TrainConfig()
    space = check_space(default_space(base), base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        config = base.replace(**suggest(study.ask(), space))
        assert config.arch in DEFAULT_SPACE["arch"] and 1e-4 <= config.lr <= 3e-3
    assert "arch" not in default_space(TrainConfig(weights="/models/resnet.safetensors"))
