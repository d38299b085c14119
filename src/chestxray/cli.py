"""The ``chestxray`` command: a thin layer over the Python API.

Every :class:`ChestXrayError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ChestXrayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, explain and serve chest X-ray classifiers. Not a diagnostic device.")
console = Console()
err_console = Console(stderr=True)

DataArg = typer.Argument(..., help="A class folder tree, a CSV/TSV manifest (path,label[,patient_id,split]) "
                                   "or a MedMNIST .npz file.")
CacheOpt = typer.Option(None, "--cache-dir", help="Preprocessing cache folder [default: ~/.cache/chestxray].")


@app.command()
def audit(data: Path = DataArg,
          against: Optional[Path] = typer.Option(None, "--against", help="A second dataset to check for overlap."),
          out: Path = typer.Option(Path("runs/audit"), "--out", help="Folder for the report files."),
          fmt: str = typer.Option("md", "--format", help="Report format: md or html."),
          cache_dir: Optional[Path] = CacheOpt) -> None:
    """Dataset report: counts, formats, unreadable files, duplicates, patient overlap, shortcut check."""
    from .audit import audit as run_audit, render_terminal

    report = run_audit(data, against=against, out_dir=out, cache_dir=cache_dir, fmt=fmt)
    render_terminal(report, console)


@app.command()
def train(data: Path = DataArg,
          config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (flags win)."),
          out: Path = typer.Option(Path("runs"), "--out", help="Parent folder of run directories."),
          name: Optional[str] = typer.Option(None, "--name", help="Run name [default: a timestamp]."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run --name from its last checkpoint."),
          arch: Optional[str] = typer.Option(None, help="timm architecture [default: tf_efficientnet_lite0]."),
          weights: Optional[str] = typer.Option(None, help="imagenet, none, or a local weights file."),
          image_size: Optional[int] = typer.Option(None, "--image-size"),
          fit_mode: Optional[str] = typer.Option(None, "--fit-mode", help="pad or crop."),
          epochs: Optional[int] = typer.Option(None),
          batch_size: Optional[int] = typer.Option(None, "--batch-size"),
          optimizer: Optional[str] = typer.Option(None, help="adamw, adam, rmsprop or sgd."),
          lr: Optional[float] = typer.Option(None),
          schedule: Optional[str] = typer.Option(None, help="cosine, plateau or none."),
          freeze_epochs: Optional[int] = typer.Option(None, "--freeze-epochs"),
          label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
          balance: Optional[str] = typer.Option(None, help="none, weights or sampler."),
          augment: Optional[float] = typer.Option(None, help="Augmentation strength (0 = none)."),
          hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip"),
          drop_rate: Optional[float] = typer.Option(None, "--dropout"),
          val_fraction: Optional[float] = typer.Option(None, "--val-fraction"),
          patience: Optional[int] = typer.Option(None),
          seed: Optional[int] = typer.Option(None),
          devices: Optional[str] = typer.Option(None, help="auto, or a number of devices/processes."),
          num_nodes: Optional[int] = typer.Option(None, "--num-nodes"),
          strategy: Optional[str] = typer.Option(None, help="auto, or ddp for data-parallel."),
          cache_dir: Optional[Path] = CacheOpt) -> None:
    """Fine-tune a model on DATA (its test split is never used) and write a run directory and bundle."""
    overrides = {k: v for k, v in locals().items()
                 if k not in ("data", "config", "out", "name", "resume", "cache_dir")}
    from .config import load_config
    from .train import fit

    settings = None if resume else load_config(config, **overrides)
    result = fit(data, settings, out_dir=out, name=name, resume=resume, cache_dir=cache_dir)
    console.print(f"bundle: {result.bundle_dir}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ChestXrayError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
