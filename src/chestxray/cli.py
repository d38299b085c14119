"""The ``chestxray`` command: a thin layer over the Python API.

Every :class:`ChestXrayError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

__all__ = ["app", "run"]

import functools
import inspect
import logging
import os
import sys
import typing
from collections.abc import Callable
import time
from pathlib import Path
from typing import Optional

import typer

from .console import make_console
from .errors import ChestXrayError

def _flag_type(option: typer.core.TyperOption, ctx) -> Optional[str]:
    """An option's type as --help shows it; none for a flag (``--tta``, ``--onnx/--no-onnx``, ``--help``):
    typer would show ``<bool>``, a value that is never typed."""
    return None if option.is_flag else _typer_type(option, ctx)


_typer_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # the one place chestxray's help is drawn

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, explain and serve chest X-ray classifiers. Not a diagnostic device.")
console = make_console()
err_console = make_console(stderr=True)


def _versions() -> dict[str, str]:
    """chestxray's version and those of the libraries it runs on, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = {"chestxray": __version__}
    for package in ("torch", "timm", "lightning", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _show_version(value: bool) -> None:
    if value:
        from .allocator import command_allocator

        versions = _versions()
        console.print(f"chestxray {versions.pop('chestxray')} ("
                      + ", ".join(f"{name} {v}" for name, v in versions.items())
                      + f"; commands run on allocator {command_allocator()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Show the version, the libraries' versions and the allocator.")) -> None:
    """Train, evaluate, explain and serve chest X-ray classifiers. Not a diagnostic device."""


@app.command()
def info() -> None:
    """The machine as chestxray sees it: versions, allocator, compute threads, accelerators, ONNX providers."""
    import torch

    from .allocator import ENV, active_allocator, find_library

    for name, value in _versions().items():
        console.print(f"{name:<12} {value}", highlight=False)
    library = find_library()
    console.print(f"{'allocator':<12} {active_allocator()} ({ENV}={os.environ.get(ENV, 'tcmalloc')}; "
                  f"library {library or 'not found'})", highlight=False, soft_wrap=True)
    console.print(f"{'threads':<12} {torch.get_num_threads()}", highlight=False)
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    console.print(f"{'cuda':<12} {', '.join(cuda) if cuda else 'none'}", highlight=False)
    try:
        import onnxruntime

        console.print(f"{'onnx':<12} {', '.join(onnxruntime.get_available_providers())}", highlight=False)
    except ImportError:
        console.print(f"{'onnx':<12} onnxruntime not installed", highlight=False)

DataArg = typer.Argument(..., help="A class folder tree, a CSV/TSV manifest (path,label[,patient_id,split]), "
                                   "a MedMNIST .npz file, or a public data set's label file (CheXpert, PadChest, "
                                   "RSNA, VinDr-CXR, NIH) or folder (MIMIC-CXR-JPG, CheXpert).")
DataFormatOpt = typer.Option("auto", "--data-format", help="How DATA is read: auto (detected), folder, manifest, "
                             "medmnist, nih, chexpert, mimic, padchest, rsna or vindr.", rich_help_panel="Data options")
UncertainOpt = typer.Option("ones", "--uncertain", help="CheXpert/MIMIC-CXR uncertain findings (-1): ones, zeros or "
                            "ignore (the image is left out).", rich_help_panel="Data options")
ViewsOpt = typer.Option("frontal", "--views", help="Public data sets' views kept: frontal (PA or AP), pa, ap, lateral "
                        "or all.", rich_help_panel="Data options")
RatersOpt = typer.Option("majority", "--raters", help="VinDr-CXR: a finding counts when a majority, or any, of the "
                         "image's radiologists marked it.", rich_help_panel="Data options")


def _source(data_format: str, uncertain: str, views: str, raters: str) -> dict[str, str]:
    """``load_samples``'s keyword arguments from the data options."""
    return {"format": data_format, "uncertain": uncertain, "views": views, "raters": raters}

CacheOpt = typer.Option(None, "--cache-dir", help="Preprocessing cache folder (default: ~/.cache/chestxray).")


@app.command()
def audit(data: Path = DataArg,
          against: Optional[Path] = typer.Option(None, "--against", help="A second dataset to check for overlap."),
          out: Path = typer.Option(Path("runs/audit"), "--out", help="Folder for the report files."),
          fmt: str = typer.Option("md", "--format", help="Report format: md or html."),
          cache_dir: Optional[Path] = CacheOpt, data_format: str = DataFormatOpt, uncertain: str = UncertainOpt,
          views: str = ViewsOpt, raters: str = RatersOpt) -> None:
    """Dataset report: counts, formats, unreadable files, duplicates, patient overlap, shortcut check."""
    from .data.audit import audit as run_audit, render_terminal

    report = run_audit(data, against=against, out_dir=out, cache_dir=cache_dir, fmt=fmt,
                       source_options=_source(data_format, uncertain, views, raters))
    render_terminal(report, console)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (e.g. a sweep's best.yaml); flags win.")
OutOpt = typer.Option(Path("runs"), "--out", help="Parent folder of run directories.")
NameOpt = typer.Option(None, "--name", help="Run name (default: a timestamp).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing run folder of this --name.")


def training_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one typed option per field of ``TrainConfig`` and ``RuntimeSettings``, generated
    from their declarations (help, default, constraint; shown in one ``--help`` panel per group;
    booleans as ``--flag/--no-flag``). The command receives the options given as
    ``settings=(config overrides, runtime overrides)``; options left out are not in them."""
    from .training.config import Choices, RuntimeSettings, TrainConfig, declared_options

    signature = inspect.signature(command)
    hints = typing.get_type_hints(command)
    params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "settings"]
    groups = {cls: declared_options(cls) for cls in (TrainConfig, RuntimeSettings)}
    for options in groups.values():
        for name, default, meta in options:
            flag = name.replace("_", "-")
            check = meta["check"]
            shown = str(default).lower() if isinstance(default, bool) else default if default != "" else "none"
            limit = f"; {check}" if check is not None and not isinstance(check, Choices) else ""
            text = f"{meta['help']} (default: {shown}{limit})"
            metavar = "[" + "|".join(map(str, check.values)) + "]" if isinstance(check, Choices) else None
            kind, parse = type(default), None
            if name == "lr":  # a number, or `auto`: the learning-rate finder's suggestion
                kind, parse, metavar = str, _lr_value, "FLOAT|auto"
                text += "; auto: the learning-rate finder's suggestion (train and cv)"
            declared = typer.Option(None, f"--{flag}/--no-{flag}" if isinstance(default, bool) else f"--{flag}",
                                    help=text, metavar=metavar, show_default=False, callback=parse,
                                    rich_help_panel=f"{meta['group']} options")
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declared,
                                            annotation=Optional[kind]))

    @functools.wraps(command)
    def with_settings(**values: object) -> None:
        given = [{name: values.pop(name) for name, _, _ in options} for options in groups.values()]
        command(**values, settings=tuple({k: v for k, v in part.items() if v is not None} for part in given))

    with_settings.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    with_settings.__annotations__ = {p.name: p.annotation for p in params}
    return with_settings


def _lr_value(value: Optional[str]) -> object:
    """``--lr``: a number, or ``auto``."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"a number or auto, not {value!r}") from None


def _lr_search(settings: tuple[dict, dict]) -> tuple[tuple[dict, dict], object]:
    """The settings without ``--lr auto``, and the finder's search it asks for (``None`` without it)."""
    from .training.train import LRSearch

    training, runtime = settings
    if training.get("lr") != "auto":
        return settings, None
    return ({k: v for k, v in training.items() if k != "lr"}, runtime), LRSearch()


def _settings(command: str, config: Optional[Path], settings: tuple[dict, dict]):
    """The training config and runtime settings from --config and the command's flags (flags win)."""
    from .training.config import load_config, load_runtime
    from .launch import world_size

    if settings[0].get("lr") == "auto":
        raise ChestXrayError(f"--lr auto goes with train and cv; {command} takes a number "
                             "(chestxray lr-find DATA suggests one)")
    if command in ("cv", "sweep") and world_size() > 1:
        raise ChestXrayError(f"`chestxray {command}` runs its models one after the other in one "
                             "process: launch it without torchrun")
    train_overrides, runtime_overrides = settings
    return load_config(config, **train_overrides), load_runtime(config, **runtime_overrides)


BatchOpt = typer.Option(None, "--batch-size", min=1, help="Images per model call (default: the runners' scoring "
                        "batch, the fastest measured on a CPU; bench/bench_scoring_batch.py).")


def _batch(batch_size: Optional[int]) -> int:
    """``--batch-size``, or the runners' default."""
    from .model.runners import DEFAULT_BATCH

    return batch_size or DEFAULT_BATCH


@app.command()
@training_options
def train(data: Path = DataArg, config: Optional[Path] = ConfigOpt, out: Path = OutOpt,
          name: Optional[str] = NameOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue the run --name from its last checkpoint "
                                      "(with its saved config; hardware options still apply)."),
          overwrite: bool = OverwriteOpt,
          onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also export the bundle to ONNX (parity-checked "
                                    "on validation X-rays): predict and serve then start fast and run 2-5x faster."),
          cache_dir: Optional[Path] = CacheOpt, settings: tuple = ({}, {})) -> None:
    """Fine-tune a model on DATA (its test split is never used) and write a run directory and bundle.

    --lr auto runs the learning-rate finder first and trains at its suggestion (see lr-find)."""
    from .training.train import fit

    settings, search = _lr_search(settings)
    training, runtime = _settings("train", config, settings)
    result = fit(data, None if resume else training, runtime, out_dir=out, name=name, resume=resume,
                 overwrite=overwrite, cache_dir=cache_dir, onnx=onnx, lr_search=search)
    if not result.metrics:  # a rank other than 0 of a distributed run
        return
    if result.lr_finding is not None:
        console.print(f"lr: {result.lr_finding.suggestion:.3g}, the learning-rate finder's suggestion "
                      f"({result.run_dir / 'lr_find.png'})", soft_wrap=True)
    if result.onnx is not None:
        console.print(f"onnx: {result.onnx.path} (max probability difference {result.onnx.max_prob_diff:.1e} on "
                      f"{result.onnx.n_images} images)", soft_wrap=True)
    console.print(f"bundle: {result.bundle_dir}", soft_wrap=True)


@app.command()
@training_options
def cv(data: Path = DataArg, folds: int = typer.Option(5, "--folds", "-k"),
       keep_models: bool = typer.Option(False, "--keep-models", help="Save the fold models as one ensemble bundle."),
       config: Optional[Path] = ConfigOpt, out: Path = OutOpt, name: Optional[str] = NameOpt,
       overwrite: bool = OverwriteOpt, cache_dir: Optional[Path] = CacheOpt, settings: tuple = ({}, {})) -> None:
    """Stratified, patient-grouped k-fold cross-validation on DATA's training images.

    --lr auto: each fold trains at the learning-rate finder's suggestion on its own training images."""
    from .training.cv import cross_validate

    settings, search = _lr_search(settings)
    training, runtime = _settings("cv", config, settings)
    result = cross_validate(data, training, folds, runtime, out_dir=out, name=name, keep_models=keep_models,
                            overwrite=overwrite, cache_dir=cache_dir, lr_search=search)
    _render_cv(result)
    console.print(f"results: {result.run_dir}" + (f"\nbundle: {result.bundle_dir}" if result.bundle_dir else ""),
                  soft_wrap=True)


@app.command()
@training_options
def sweep(data: Path = DataArg, trials: int = typer.Option(20, "--trials", "-n"),
          timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after S seconds."),
          config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with a base config under "
                                                "`train:` and an optional search `space:`."),
          out: Path = OutOpt, name: Optional[str] = NameOpt, overwrite: bool = OverwriteOpt,
          cache_dir: Optional[Path] = CacheOpt, settings: tuple = ({}, {})) -> None:
    """Optuna hyperparameter search with pruning; writes trials.csv and best.yaml (for train --config)."""
    from .training.sweep import load_space, sweep as run_sweep

    training, runtime = _settings("sweep", config, settings)
    result = run_sweep(data, training, trials, runtime, out_dir=out, name=name, timeout=timeout,
                       cache_dir=cache_dir, space=load_space(config) if config else None, overwrite=overwrite)
    _render_sweep(result)
    best = result.run_dir / "best.yaml"
    console.print(f"best config: {best} (retrain with: chestxray train DATA --config {best})"
                  + (f"\nbundle of the best trial: {result.bundle_dir}" if result.bundle_dir else ""), soft_wrap=True)


@app.command("show-batch")
@training_options
def show_batch(data: Path = DataArg, n: int = typer.Option(16, "--n", "-n", min=1, help="Images shown."),
               split: str = typer.Option("train", "--split", help="train (augmented as epoch 1 draws them) or val "
                                         "(as validation feeds them: no augmentation)."),
               out: Path = typer.Option(Path("runs/show_batch.png"), "--out", help="The PNG to write."),
               config: Optional[Path] = ConfigOpt, cache_dir: Optional[Path] = CacheOpt,
               settings: tuple = ({}, {})) -> None:
    """A PNG grid of what training feeds the model (preprocessed, augmented, one channel), titled label and file.

    --split train: the first inputs of epoch 1 as the run draws them (before mixup); --split val: the
    validation inputs, unaugmented. The options are train's: --config, --image-size, --augment, ... apply."""
    from .training.look import show_batch as run_show_batch

    _check_output(out)
    training, _ = _settings("show-batch", config, settings)
    view = run_show_batch(data, training, n=n, split=split, out=out, cache_dir=cache_dir,
                          progress=err_console.is_terminal)
    console.print(f"{len(view.images)} {'training' if split == 'train' else 'validation'} inputs, "
                  f"{view.images.shape[-1]} px, values {view.images.min():.2f} to {view.images.max():.2f} "
                  f"(mean {view.images.mean():.2f}): {view.path}", soft_wrap=True, highlight=False)


@app.command("lr-find")
@training_options
def lr_find(data: Path = DataArg,
            num_training: int = typer.Option(100, "--num-training", min=2, help="Steps of the search, one learning "
                                             "rate each (fewer: faster, a coarser curve)."),
            min_lr: float = typer.Option(1e-6, "--min-lr", min=0, help="First learning rate tried."),
            max_lr: float = typer.Option(1.0, "--max-lr", min=0, help="Last learning rate tried."),
            config: Optional[Path] = ConfigOpt, out: Path = OutOpt, name: Optional[str] = NameOpt,
            overwrite: bool = OverwriteOpt, cache_dir: Optional[Path] = CacheOpt, settings: tuple = ({}, {})) -> None:
    """Lightning's learning-rate finder on the model, data and recipe that train would use; prints its suggestion.

    Writes lr_find.png (the curve, the suggestion marked), lr_find.json (suggestion and curve) and
    config.yaml (the recipe at the suggested rate, for train --config) to a run folder under --out."""
    from .training.look import lr_find as run_lr_find
    from .training.train import LRSearch

    training, runtime = _settings("lr-find", config, settings)
    result = run_lr_find(data, training, runtime, LRSearch(num_training, min_lr, max_lr), out_dir=out, name=name,
                         overwrite=overwrite, cache_dir=cache_dir)
    console.print(f"suggested lr: {result.finding.suggestion:.3g} ({len(result.finding.lrs)} steps from "
                  f"{min_lr:g} to {max_lr:g}, {result.finding.seconds:.0f}s)", highlight=False)
    console.print(f"curve: {result.run_dir / 'lr_find.png'}\ntrain at it: chestxray train DATA --config "
                  f"{result.run_dir / 'config.yaml'}", soft_wrap=True, highlight=False)


BundleArg = typer.Argument(..., help="A model bundle folder (runs/<name>/bundle).")
MAX_LISTED = 20  # unreadable files named on the terminal; metrics.json lists them all
BACKEND_HELP = ("auto (onnx when the bundle has model.onnx, made by `chestxray export`, else torch), torch, onnx, "
                "or onnx-int8 (model.int8.onnx, made by `chestxray export --quantize int8`).")


@app.command()
def evaluate(bundle: Path = BundleArg, data: Path = DataArg,
             out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json, "
                                      "predictions.csv and report.html."),
             split: str = typer.Option("auto", help="auto (the test split if any, else all), all, train, val, test."),
             n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% intervals."),
             seed: int = typer.Option(0, help="Bootstrap seed."),
             cam_gallery: int = typer.Option(8, "--cam-gallery", help="Most confident errors shown with Grad-CAM."),
             batch_size: Optional[int] = BatchOpt,
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier evaluation "
                                            "in --out."),
             cache_dir: Optional[Path] = CacheOpt, data_format: str = DataFormatOpt, uncertain: str = UncertainOpt,
             views: str = ViewsOpt, raters: str = RatersOpt) -> None:
    """Metrics with 95% bootstrap intervals, calibration and an HTML report of BUNDLE on DATA.

    Exit 1 if any file was unreadable: named on stderr, left out of the metrics, listed in metrics.json.
    """
    from .inference.evaluation import evaluate as run_evaluate, headline

    result = run_evaluate(bundle, data, out, split=split, n_boot=n_boot, seed=seed, cam_gallery=cam_gallery,
                          batch_size=_batch(batch_size), cache_dir=cache_dir, progress=err_console.is_terminal,
                          overwrite=overwrite, source_options=_source(data_format, uncertain, views, raters))
    for line in headline(result):
        console.print(line, soft_wrap=True)
    console.print(f"report: {result.out_dir / 'report.html'}", soft_wrap=True)
    if result.failed:  # the figures leave these out: name them, and exit 1 as predict does
        for file, reason in result.failed[:MAX_LISTED]:
            err_console.print(f"unreadable: {file}: {reason}", markup=False, highlight=False, soft_wrap=True)
        more = len(result.failed) - MAX_LISTED
        err_console.print(f"{len(result.failed)} unreadable file(s) left out of the metrics"
                          + (f" ({more} more listed in {result.files['metrics']})" if more > 0 else ""))
        raise typer.Exit(1)


AuditOpt = typer.Option(None, "--audit-log", help="Audit trail file, one JSON line per inference (default: "
                        "$CHESTXRAY_AUDIT_LOG, else ~/.local/state/chestxray/audit.jsonl).")
NoAuditOpt = typer.Option(False, "--no-audit", help="Write no audit trail.")
PatientFieldsOpt = typer.Option(False, "--audit-patient-fields",
                                help="Keep patient id, name, birth date, sex and accession number in audit lines.")


def _check_coverage(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value < 1.0:
        raise typer.BadParameter(f"a share between 0 and 1 (e.g. 0.9), not {value:g}")
    return value


CoverageOpt = typer.Option(None, "--coverage", callback=_check_coverage, rich_help_panel="Trust options",
                           help="Coverage of the conformal prediction sets, a share between 0 and 1: a larger one "
                                "gives larger sets and more referrals (default: the bundle's, 0.9).")
HeaderCheckOpt = typer.Option(True, "--header-check/--no-header-check", rich_help_panel="Trust options",
                              help="Refer DICOMs whose header says they are not frontal chest radiographs "
                                   "(modality, body part, view, frames, image type).")


def _trust(coverage: Optional[float], header_check: bool) -> dict:
    """``load_model``'s keywords for --coverage and --header-check/--no-header-check."""
    from .data.dicomcheck import DEFAULT_POLICY

    return {"coverage": coverage, "header_policy": DEFAULT_POLICY if header_check else None}


def _audit_trail(path: Optional[Path], disabled: bool, patient_fields: bool = False):
    """The audit trail the options ask for, or None with --no-audit."""
    from .dicom.inferencelog import AuditTrail

    return None if disabled else AuditTrail(path, patient_fields=patient_fields)


@app.command()
@training_options
def adapt(bundle: Path = BundleArg,
          data: Path = typer.Argument(..., help="The site's labelled images: a class folder tree, a CSV/TSV manifest "
                                                "or a MedMNIST .npz (every split is used); with --unlabeled or "
                                                "--suggest, any folder of images (labels ignored)."),
          out: Path = typer.Option(..., "--out", help="Folder for the child bundle (with adaptation.json and "
                                                       "adaptation.html); with --suggest, the CSV to write."),
          unlabeled: bool = typer.Option(False, "--unlabeled", help="Adapt from the site's images alone: pseudo-labels "
                                         "by feature centroids, a new classifier layer, sets refitted on the parent's "
                                         "validation images weighted towards the site, OOD and drift references "
                                         "refitted."),
          site_classes: Optional[str] = typer.Option(None, "--site-classes", help="Comma-separated classes that occur "
                                                     "at the site (e.g. no covid19 at a children's hospital); the "
                                                     "others are never predicted and leave the sets."),
          suggest: Optional[int] = typer.Option(None, "--suggest", min=1, help="Write the N site images whose labels "
                                                "would help most as a CSV (--out) to fill in; adapts nothing."),
          labels: Optional[Path] = typer.Option(None, "--labels", help="With --unlabeled: a CSV (path,label) of the "
                                                "site images a person labelled, e.g. the --suggest CSV filled in."),
          reference: Optional[Path] = typer.Option(None, "--reference", help="With --unlabeled: labelled images of the "
                                                   "bundle's own kind that it did not train on, for a bundle without "
                                                   "heldout.npz (trained by an older chestxray)."),
          backbone_epochs: int = typer.Option(0, "--backbone-epochs", min=0, max=100, help="With --unlabeled: first "
                                              "train the backbone on the site's images for N epochs, classifier "
                                              "frozen (SHOT-IM; about a minute per 500 images on 2 cores); needs the "
                                              "run's split.csv beside the bundle, or --reference."),
          mode: str = typer.Option("recalibrate", "--mode", help="recalibrate (weights untouched: logit transform, "
                                   "operating points, OOD reference scores) or finetune (continue training)."),
          with_data: Optional[Path] = typer.Option(None, "--with", help="finetune: also train on this labelled data "
                                                   "(e.g. the original training set; its test split is left out)."),
          folds: int = typer.Option(5, "--folds", "-k", help="Folds of the before/after estimate inside the sample."),
          n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% intervals."),
          onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="finetune and --unlabeled: also export the "
                                    "child to ONNX (recalibrate copies the parent's graph: same weights)."),
          cache_dir: Optional[Path] = CacheOpt, settings: tuple = ({}, {})) -> None:
    """Adapt BUNDLE to a new site from a small labelled sample; print an honest k-fold before/after estimate.

    --unlabeled adapts from the site's images alone; --suggest N names the images worth labelling first.

    Training and hardware options (finetune only) override the short fine-tuning run, e.g. --epochs 6;
    --seed (default 0) also seeds the folds and the bootstrap.
    """
    from .training.adapt import adapt as run_adapt, headline
    from .training.config import RuntimeSettings

    overrides, runtime_overrides = dict(settings[0]), settings[1]
    seed = overrides.pop("seed", 0)
    declared = site_classes.split(",") if site_classes is not None else None
    if reference is not None and not unlabeled:
        raise ChestXrayError("--reference goes with --unlabeled (it stands in for the bundle's heldout.npz)")
    if backbone_epochs and not unlabeled:
        raise ChestXrayError("--backbone-epochs goes with --unlabeled (label-free training of the backbone)")
    if labels is not None and not unlabeled:
        raise ChestXrayError("--labels goes with --unlabeled (labelled images where a person gave labels, the "
                             "site's other images for the rest); a labelled folder needs neither")
    if suggest is not None or unlabeled:
        if mode != "recalibrate" or with_data is not None or overrides or runtime_overrides:
            raise ChestXrayError("--unlabeled and --suggest take no --mode finetune, --with or training options")
        from .training.adapt_unlabeled import adapt_unlabeled, suggest_labels, unlabeled_headline

        if suggest is not None:
            table = suggest_labels(bundle, data, suggest, out, site_classes=declared, seed=seed, cache_dir=cache_dir,
                                   progress=err_console.is_terminal)
            console.print(f"{len(table)} images to label: {out} (fill in its label column, then run chestxray adapt "
                          f"BUNDLE IMAGES --unlabeled --labels {out} --out CHILD)", soft_wrap=True, highlight=False)
            return
        found = adapt_unlabeled(bundle, data, out, site_classes=declared, seed=seed, cache_dir=cache_dir,
                                progress=err_console.is_terminal, labels=labels, onnx=onnx,
                                reference=reference, backbone_epochs=backbone_epochs)
        if found.onnx is not None:
            console.print(f"onnx: {found.onnx.path} (max probability difference {found.onnx.max_prob_diff:.1e})")
        for line in unlabeled_headline(found):
            console.print(line, soft_wrap=True, highlight=False)
        console.print(f"bundle: {found.bundle_dir}", soft_wrap=True)
        return
    if (overrides or runtime_overrides) and mode != "finetune":
        given = ", ".join("--" + k.replace("_", "-") for k in [*overrides, *runtime_overrides])
        raise ChestXrayError(f"training options ({given}) only apply to --mode finetune")
    result = run_adapt(bundle, data, out, mode=mode, with_data=with_data, folds=folds, seed=seed, n_boot=n_boot,
                       overrides=overrides, runtime=RuntimeSettings().replace(**runtime_overrides),
                       cache_dir=cache_dir, progress=err_console.is_terminal, site_classes=declared, onnx=onnx)
    if result.onnx is not None:
        console.print(f"onnx: {result.onnx.path} (max probability difference {result.onnx.max_prob_diff:.1e})")
    for line in headline(result):
        console.print(line, soft_wrap=True, highlight=False)
    console.print(f"bundle: {result.bundle_dir}\nestimate: {result.bundle_dir / 'adaptation.json'}", soft_wrap=True)


@app.command()
def predict(bundle: Path = BundleArg,
            inputs: Optional[list[str]] = typer.Argument(None, help="Image or DICOM files, folders or globs."),
            fmt: str = typer.Option("table", "--format", help="table, csv or json."),
            out: Optional[Path] = typer.Option(None, "--out", help="Write the results to this file."),
            cam: Optional[Path] = typer.Option(None, "--cam", help="Write Grad-CAM overlays (PNG) into this folder."),
            tta: bool = typer.Option(False, "--tta", help="Average over mild test-time augmentations."),
            operating_point: Optional[str] = typer.Option(
                None, "--operating-point",
                help="Add a 'called' column: the classes at or above their threshold at this point, "
                     "chosen on validation (youden, sensitivity_90 or sensitivity_95)."),
            backend: str = typer.Option("auto", help=BACKEND_HELP),
            batch_size: Optional[int] = BatchOpt,
            dicomweb: Optional[str] = typer.Option(None, "--dicomweb", help="DICOMweb root URL to retrieve "
                                                   "--study from (WADO-RS) or the worklist's studies."),
            study: Optional[list[str]] = typer.Option(None, "--study", help="StudyInstanceUID to retrieve "
                                                      "from --dicomweb (repeatable)."),
            stow: bool = typer.Option(False, "--stow", help="Store a structured report per image back into "
                                      "its study by STOW-RS."),
            worklist: Optional[Path] = typer.Option(None, "--worklist", help="CSV with a 'path' or "
                                                    "'study_instance_uid' column; results go to --out "
                                                    "(default FILE.results.csv); a rerun resumes."),
            audit_log: Optional[Path] = AuditOpt, no_audit: bool = NoAuditOpt,
            audit_patient_fields: bool = PatientFieldsOpt,
            coverage: Optional[float] = CoverageOpt, header_check: bool = HeaderCheckOpt) -> None:
    """Predict files, folders and globs, DICOMweb studies or a worklist; each row of files says whether to
    refer it (prediction set, OOD, DICOM header) and why, and cautions about source-confounded classes.
    Exit 1 if any input failed."""
    from .inference.predict import load_model, predict_files

    if fmt not in ("table", "csv", "json"):
        raise ChestXrayError(f"--format must be table, csv or json, not {fmt!r}")
    if out is not None:  # before predicting: an output that cannot be written must not cost the work
        _check_output(out)
    trail = _audit_trail(audit_log, no_audit, audit_patient_fields)
    if worklist is not None or dicomweb or study:
        if inputs:
            raise ChestXrayError("give files, or --worklist, or --dicomweb with --study: not several")
        _predict_pacs(load_model(bundle, backend=backend, **_trust(coverage, header_check)), fmt, out, dicomweb,
                      study or [], stow, worklist, _batch(batch_size), trail)
        return
    if not inputs:
        raise ChestXrayError("nothing to predict: give files, folders or globs, --worklist, or --dicomweb and --study")
    started = time.perf_counter()
    run = predict_files(bundle, inputs, backend=backend, batch_size=_batch(batch_size), tta=tta,
                        operating_point=operating_point, cam_dir=cam, progress=err_console.is_terminal,
                        coverage=coverage, header_check=header_check)
    if run is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return
    if trail is not None:
        from .dicom.inferencelog import audit_predictions
        from .model.bundle import read_meta

        audit_predictions(trail, run.predictions, read_meta(bundle),
                          (time.perf_counter() - started) * 1000 / max(1, len(run.predictions)))
    if fmt == "table":
        _render_predictions(run.predictions)
    _write_table(run.table, "csv" if fmt == "table" else fmt, out, records=[p.to_dict() for p in run.predictions],
                 echo=fmt != "table")
    if cam is not None:
        err_console.print(f"{len(run.cams)} Grad-CAM overlay(s) in {cam}")
    for file, error in run.failed:
        err_console.print(f"error: {file}: {error}", markup=False, highlight=False, soft_wrap=True)
    if run.failed:
        raise typer.Exit(1)


@app.command()
def export(bundle: Path = BundleArg,
           fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
           out: Optional[Path] = typer.Option(None, "--out", help="File or folder (default: BUNDLE/model.onnx, "
                                              "with --quantize int8 BUNDLE/model.int8.onnx)."),
           opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or newer)."),
           parity_images: Optional[list[Path]] = typer.Option(None, "--parity-image",
                                                               help="Real X-rays for the parity check (repeatable)."),
           quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: static INT8 quantization "
                                                  "(onnxruntime, QDQ), calibrated on --calibration-data."),
           calibration_data: Optional[Path] = typer.Option(
               None, "--calibration-data", help="Training images to calibrate INT8 on (a folder, CSV or .npz; "
                                                "its test split is never read); the others check parity."),
           calibration_images: int = typer.Option(256, "--calibration-images", help="Images calibrated on "
                                                  "(at most half of --calibration-data without --parity-data)."),
           parity_data: Optional[Path] = typer.Option(
               None, "--parity-data", help="Other real X-rays for the INT8 parity check (default: calibration "
                                           "data images not calibrated on)."),
           keep_fp32: Optional[str] = typer.Option(None, "--keep-fp32", help="INT8: comma-separated parts left in "
                                                   "FP32: stem, head, depthwise, se (squeeze-and-excitation gates)."),
           min_agreement: float = typer.Option(0.99, "--min-agreement",
                                               help="Refuse the INT8 model below this share of labels agreeing "
                                                    "with the FP32 model.")) -> None:
    """Export BUNDLE to ONNX; refuses to write a model whose outputs differ from PyTorch's (INT8: whose
    labels differ from the FP32 model's on more than 1% of real X-rays)."""
    if fmt != "onnx":
        raise ChestXrayError(f"--format {fmt!r} is not supported: use onnx")
    if quantize is None:
        if calibration_data is not None or parity_data is not None or keep_fp32 is not None:
            raise ChestXrayError("--calibration-data, --parity-data and --keep-fp32 go with --quantize int8")
        from .deploy.export import export_onnx

        result = export_onnx(bundle, out, opset=opset, parity_images=parity_images)
        console.print(f"{result.path}: opset {result.opset}, {result.size_bytes / 1e6:.1f} MB, parity on "
                      f"{result.n_images} images: max probability difference {result.max_prob_diff:.1e}",
                      soft_wrap=True)
        return
    if quantize != "int8":
        raise ChestXrayError(f"--quantize {quantize!r} is not supported: use int8")
    if calibration_data is None:
        raise ChestXrayError("--quantize int8 needs --calibration-data: a few hundred of the training images")
    from .deploy.quantize import QuantSettings, quantize_bundle

    parts = tuple(part.strip() for part in (keep_fp32 or "").split(",") if part.strip())
    result = quantize_bundle(bundle, calibration_data, out, n_calibration=calibration_images, parity_data=parity_data,
                             min_agreement=min_agreement, opset=opset, parity_images=parity_images,
                             settings=QuantSettings(keep_fp32=parts), progress=err_console.is_terminal)
    parity = result.parity
    ood = "" if parity.ood_flag_agreement is None else f", OOD flags agree on {parity.ood_flag_agreement:.1%}"
    console.print(f"{result.path}: INT8, {result.size_bytes / 1e6:.1f} MB, calibrated on {result.n_calibration} "
                  f"images; parity on {parity.n_images} other real X-rays: labels agree on "
                  f"{parity.label_agreement:.1%}, max probability difference {parity.max_prob_diff:.3f}{ood}",
                  soft_wrap=True)


@app.command()
def serve(bundle: Path = BundleArg,
          host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000, min=1, max=65535, help="TCP port of the API and the web page."),
          backend: str = typer.Option("auto", help=BACKEND_HELP),
          workers: int = typer.Option(1, min=1, help="Server processes, each with its own model."),
          threads: Optional[int] = typer.Option(None, min=1,
                                                help="Compute threads per worker (default: cores / workers)."),
          max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, max=1024,
                                              help="Largest accepted upload."),
          max_per_client: int = typer.Option(32, "--max-connections-per-client", min=1,
                                             help="Open connections allowed from one address (raise it behind "
                                                  "a reverse proxy)."),
          audit_log: Optional[Path] = AuditOpt, no_audit: bool = NoAuditOpt,
          audit_patient_fields: bool = PatientFieldsOpt,
          coverage: Optional[float] = CoverageOpt, header_check: bool = HeaderCheckOpt) -> None:
    """REST API (POST /v1/predict) and a web page for BUNDLE. Set CHESTXRAY_API_KEY to require a key."""
    from .dicom.inferencelog import AUDIT_ENV, PATIENT_FIELDS_ENV
    from .serving.serve import serve as run_server

    if no_audit or audit_log:  # the server processes read these
        os.environ[AUDIT_ENV] = "off" if no_audit else str(audit_log.resolve())
    if audit_patient_fields:
        os.environ[PATIENT_FIELDS_ENV] = "1"

    run_server(bundle, host, port, backend, workers=workers, threads=threads,
               max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_per_client=max_per_client,
               coverage=coverage, header_check=header_check)


@app.command()
def listen(bundle: Path = BundleArg,
           dest: Optional[str] = typer.Option(None, "--dest", help="Where to C-STORE the results: AE@HOST:PORT "
                                              "(without it they wait in SPOOL/outbox)."),
           ae_title: str = typer.Option("CHESTXRAY", "--ae-title", help="This node's AE title."),
           host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
           port: int = typer.Option(11112, min=1, max=65535, help="DICOM port."),
           allow: Optional[list[str]] = typer.Option(None, "--allow", help="Calling AE title allowed to send "
                                                     "(repeatable; default: any)."),
           spool: Path = typer.Option(Path("chestxray-spool"), "--spool", help="Queue folder: received instances "
                                      "and undelivered results survive a restart here."),
           cam: bool = typer.Option(False, "--cam", help="Also send the Grad-CAM overlay as a Secondary Capture."),
           min_free_mb: int = typer.Option(64, "--min-free-mb", min=0, help="Refuse instances (0xA700) when the "
                                           "spool's disk would keep less free space than this."),
           retry_max_s: float = typer.Option(300.0, "--retry-max-s", min=0.1,
                                             help="Longest wait between delivery tries."),
           max_dataset_mb: int = typer.Option(256, "--max-dataset-mb", min=1, max=1024,
                                              help="Refuse (0xA700) a received dataset larger than this."),
           max_associations: int = typer.Option(64, "--max-associations", min=1, max=1024,
                                                help="Connections served at once (at most a quarter of them "
                                                     "from one address)."),
           backend: str = typer.Option("auto", help="auto (onnx when the bundle has model.onnx, else torch), "
                                                    "torch or onnx."),
           audit_log: Optional[Path] = AuditOpt, no_audit: bool = NoAuditOpt,
           audit_patient_fields: bool = PatientFieldsOpt,
           coverage: Optional[float] = CoverageOpt, header_check: bool = HeaderCheckOpt) -> None:
    """DICOM node: receive X-rays by C-STORE, answer each with a structured report sent to --dest."""
    import logging

    from .dicom.listen import Destination, ListenConfig, listen as run_listener

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ListenConfig(spool=spool, destination=Destination.parse(dest) if dest else None, ae_title=ae_title,
                          host=host, port=port, allowed_callers=tuple(allow or ()), cam=cam,
                          min_free_bytes=min_free_mb * 2**20, retry_max_s=retry_max_s,
                          max_dataset_bytes=max_dataset_mb * 2**20, max_associations=max_associations,
                          max_per_address=max(1, max_associations // 4))
    run_listener(bundle, config, backend=backend, audit=_audit_trail(audit_log, no_audit, audit_patient_fields),
                 **_trust(coverage, header_check))


def _predict_pacs(predictor, fmt: str, out: Optional[Path], dicomweb: Optional[str], studies: list[str],
                  stow: bool, worklist: Optional[Path], batch_size: int, trail) -> None:
    """``predict --worklist`` and ``predict --dicomweb URL --study UID [--stow]``."""
    if worklist is not None:
        from .dicom.worklist import score_worklist

        if studies or stow:
            raise ChestXrayError("--worklist takes its studies from the CSV; --study and --stow do not apply")
        target = out or worklist.with_name(worklist.stem + ".results.csv")
        result = score_worklist(predictor, worklist, target, dicomweb=dicomweb, batch_size=batch_size, audit=trail)
        repeated = f", {result.duplicates} repeated row(s) scored once" if result.duplicates else ""
        err_console.print(f"{result.entries} worklist entries: {result.skipped} done before, {result.scored} scored "
                          f"now{repeated}, {result.failed} row(s) with errors; results: {result.out}")
        if result.failed:
            raise typer.Exit(1)
        return
    if not dicomweb or not studies:
        raise ChestXrayError("--dicomweb URL and --study UID go together")
    import pandas as pd

    from .dicom.dicomresult import assessments_table
    from .dicom.dicomweb import assess_study, client, store_reports
    from .dicom.worklist import audit_assessments

    web = client(dicomweb)
    tables = []
    failed = 0
    for uid in studies:
        started = time.perf_counter()
        result = assess_study(predictor, web, uid)
        audit_assessments(trail, result, (time.perf_counter() - started) * 1000 / max(1, len(result.assessments)))
        table = assessments_table(result.assessments, predictor.classes)
        if stow:
            stored = store_reports(web, result, algorithm=f"chestxray {predictor.meta.arch}")
            table["stored_sr_uid"] = stored
        for sop_uid, why in result.skipped:
            err_console.print(f"skipped: {sop_uid}: {why}", markup=False, highlight=False, soft_wrap=True)
        for label, why in result.failed:
            err_console.print(f"failed: {label}: {why}", markup=False, highlight=False, soft_wrap=True)
        failed += len(result.failed)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    if fmt == "table":
        from rich.table import Table

        view = Table("study", "instance", "label", "probability", "refer")
        for row in table.to_dict("records"):
            probability = f"{row[row['label']]:.3f}" if row["label"] in table.columns else ""
            view.add_row(row["study_instance_uid"][-12:], row["sop_instance_uid"][-16:], row["label"] or "not assessed",
                         probability, row["reasons"] if row["refer"] else "no")
        console.print(view)
        if out is not None:
            table.to_csv(out, index=False)
    else:
        _write_table(table, fmt, out)
    if stow:
        err_console.print(f"{len(table)} structured report(s) stored by STOW-RS at {dicomweb}")
    if failed:
        raise typer.Exit(1)


def _figure(value: object, spec: str = ".3f") -> str:
    """A number formatted with ``spec``, "n/a" when missing (``None`` or NaN); anything else as text."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _render_cv(result) -> None:
    """The per-fold scores, their mean ± std and the out-of-fold figures as one table."""
    from rich.table import Table

    from .training.cv import SCORES

    table = Table(title=f"{len(result.folds)}-fold cross-validation ({result.run_dir})")
    for column in ("fold", "n", *SCORES):
        table.add_column(column.replace("_", " "), justify="right")
    for row in result.folds.to_dict("records"):
        table.add_row(str(row["fold"]), str(row["n"]), *(_figure(row[s]) for s in SCORES))
    mean, std = result.summary["mean"], result.summary["std"]
    table.add_row("mean ± std", "", *(f"{_figure(mean[s])} ± {_figure(std[s])}" for s in SCORES), end_section=True)
    oof = result.summary["oof"]
    table.add_row("out-of-fold", str(oof["n"]), *(_figure(oof[s]) for s in SCORES))
    console.print(table)
    trust = result.summary.get("oof_trust")
    if trust:  # each fold model's own conformal sets (fitted on its inner validation split) on its held-out fold
        sets = trust["conformal"]
        per_class = ", ".join(f"{name} {_figure(row['coverage'], '.0%')}" for name, row in sets["per_class"].items())
        kept = ", ".join(f"{level} {_figure(row['accuracy'], '.1%')}" for level, row in trust["at_coverage"].items())
        console.print(f"prediction sets at {_figure(sets['target_coverage'], '.0%')} (each fold model's, on its "
                      f"held-out fold): coverage "
                      f"{_figure(sets['coverage'], '.1%')}, mean set size {_figure(sets['mean_set_size'], '.2f')}; "
                      f"per class {per_class}; accuracy of the most confident {kept}", soft_wrap=True)


def _render_sweep(result) -> None:
    """Every trial, best first, as one table."""
    from rich.table import Table

    frame = result.trials.sort_values("value", na_position="last")
    params = list(result.study.best_trial.params)
    table = Table(title=f"sweep {result.run_dir}: best trial {result.best_trial}, "
                        f"validation loss {result.best_value:.4f}")
    for column in ("trial", "state", "val_loss", "val_acc", *params, "seconds"):
        table.add_column(column, justify="right", overflow="fold")
    for row in frame.to_dict("records"):
        cells = [row.get("value"), row.get("val_acc"), *(row.get(p) for p in params), row.get("seconds")]
        table.add_row(str(row["number"]), str(row["state"]).lower(), *(_figure(v, ".3g") for v in cells))
    console.print(table)


def _display_names(files: list[str]) -> list[str]:
    """Files relative to the folder they share, so that two rows never read the same."""
    import os

    real = [f for f in files if os.path.sep in f]
    try:
        base = os.path.commonpath(real) if len(real) > 1 else os.path.dirname(real[0]) if real else ""
    except ValueError:  # absolute and relative paths mixed
        base = ""
    if base and all(f == base for f in real):  # a single file repeated
        base = os.path.dirname(base)
    return [os.path.relpath(f, base) if base and f.startswith(base + os.path.sep) else f for f in files]


TABLE_WIDTH = 80
"""Columns a results table fits off a terminal (in a terminal: the terminal's width, if wider)."""
REFER_CODES = {"uncertain": "set", "out_of_distribution": "ood", "not_frontal_cxr": "dicom"}
"""The short name of each kind of referral reason in a table (the reasons themselves are in --format json)."""


def _fit_names(names: list[str], width: int) -> list[str]:
    """``names`` shortened to ``width`` characters: leading folders first (``…/name``), then the middle of the
    file's own name (``head…tail``); unless two would then read the same (then all are given whole)."""
    def cut(name: str) -> str:
        if len(name) <= width:
            return name
        base = os.path.basename(name)
        if len(base) + 2 <= width:  # start at a folder, never inside one
            _, _, rest = name[len(name) - width + 2:].partition(os.path.sep)
            return "…" + os.path.sep + (rest or base)
        keep = max(width - 1, 8)
        return base[:keep // 2] + "…" + base[len(base) - (keep - keep // 2):]

    shown = [cut(name) for name in names]
    return shown if len(set(shown)) == len(set(names)) else names


def _refer_codes(reasons: list[str]) -> str:
    """``no``, or the kinds of reasons to refer joined by '+' (e.g. ``set+ood``)."""
    from .trust.referral import reason_kind

    kinds = {reason_kind(reason) for reason in reasons}
    codes = [code for kind, code in REFER_CODES.items() if kind in kinds]
    codes += ["other"] if kinds - set(REFER_CODES) else []
    return "+".join(codes) if reasons else "no"


def _render_predictions(predictions: list) -> None:
    """The predictions as one line each (short headers, no cell wider than its words), then once each: what
    the columns mean and every caution the labels carry (marked ``*``). Every figure and reason: --format json."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    called = any(p.called is not None for p in predictions)
    cautions = list(dict.fromkeys(c for p in predictions for c in p.cautions))
    coverages = sorted({p.coverage for p in predictions if p.coverage is not None})
    rows = []
    for p in predictions:
        if p.error:
            rows.append(["unreadable", "", *([""] if called else []), "", "", "", "error"])
            continue
        probability = p.probabilities.get(p.label)
        ood = "–" if p.ood_score is None else ("YES" if p.ood else "no") + (
            "" if p.ood_percentile is None else f" {p.ood_percentile:.0f}%")
        dicom = "–" if p.header is None else "FAIL" if p.header_reasons else "ok"
        rows.append([p.label + ("*" if p.cautions else ""), "" if probability is None else f"{probability:.2f}",
                     *(["|".join(p.called or []) or "–"] if called else []),
                     "–" if p.prediction_set is None else str(len(p.prediction_set)), ood, dicom,
                     _refer_codes(p.reasons)])
    headers = ["label", "p", *(["called"] if called else []), "set", "ood", "dicom", "refer"]
    shown = [i for i, h in enumerate(headers)  # a check that ran on no input is not a column
             if not (h in ("set", "ood", "dicom") and all(r[i] in ("–", "") for r in rows))]
    headers, rows = [headers[i] for i in shown], [[r[i] for i in shown] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    room = (console.width if console.is_terminal else TABLE_WIDTH) - sum(widths) - 2 * len(headers) - 1
    names = _fit_names(_display_names([p.file for p in predictions]), max(room, 16))
    table = Table("file", *headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in table.columns:  # no cell is wrapped; in a terminal too narrow for the table, cut with '…'
        column.no_wrap, column.overflow = True, "ellipsis"
    for name, row in zip(names, rows):
        table.add_row(escape(name), *map(escape, row))
    console.print(table)
    level = "/".join(f"{100 * c:g}%" for c in coverages) or "conformal"
    meaning = {"p": "the label's probability", "called": "classes at or above the operating point",
               "set": f"classes in its {level} prediction set (refer unless 1)",
               "ood": "unusual, and the share of held-out training X-rays more typical",
               "dicom": "the header check", "refer": "why a reader should look"}
    console.print("; ".join(f"{h}: {meaning[h]}" for h in headers if h in meaning)
                  + ". All reasons: --format json.", highlight=False)
    for caution in cautions:
        console.print(f"* {caution}", highlight=False, markup=False)


def _write_table(table, fmt: str, out: Optional[Path], records: Optional[list[dict]] = None, *,
                 echo: bool = True) -> None:
    """CSV or JSON with every column; the table view shows one line per file (all columns go to --out).
    ``records``: the JSON form of the rows (``Prediction.to_dict``; default: the table's rows)."""
    if fmt == "table":
        from rich.table import Table

        from rich.markup import escape

        called = "called" in table.columns
        cautions = table["cautions"].fillna("").astype(bool).any() if "cautions" in table else False
        errors = (table["error"].fillna("") != "").any()
        view = Table("file", "label (probability)", *(["called"] if called else []), "prediction set", "refer (why)",
                     "unusual (score, percentile)", *(["caution"] if cautions else []), *(["error"] if errors else []))
        for column in view.columns:
            column.overflow = "fold"  # never cut: two files must not read the same
        for row, name in zip(table.to_dict("records"), _display_names(list(table["file"]))):
            error = row["error"] if isinstance(row["error"], str) else ""
            label = f"{row['label']} ({row[row['label']]:.3f})" if row["label"] in table.columns else row["label"]
            if error:
                ood = ""
            elif row["ood_score"] is None or row["ood_score"] != row["ood_score"]:
                ood = "not checked"
            else:
                ood = f"{'YES' if row['ood'] else 'no'} ({_figure(row['ood_score'], '.1f')}, " \
                      f"{_figure(row['ood_percentile'], '.0f')}%)"
            refer = "" if error else ("[red]REFER[/]: " + escape(row["reasons"]) if row["refer"] else "no")
            view.add_row(escape(name), escape(label), *([escape(row["called"])] if called else []),
                         escape(row["prediction_set"] or ""), refer, ood,
                         *(["[yellow]" + escape(row["cautions"] or "") + "[/]"] if cautions else []),
                         *([escape(error)] if errors else []))
        console.print(view)
    text = table.to_csv(index=False) if fmt != "json" else _json_text(table, records)
    if echo and fmt != "table" and out is None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    if out is not None:
        from .storage import atomic_path

        with atomic_path(out) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        err_console.print(f"results: {out}", soft_wrap=True)


def _json_text(table, records: Optional[list[dict]]) -> str:
    """The rows as a JSON array (NaN as null, slashes unescaped), one key per line."""
    import json

    from .stats.metrics import json_safe

    rows = records if records is not None else table.astype(object).where(table.notna(), None).to_dict("records")
    return json.dumps(json_safe(rows), indent=2, ensure_ascii=False) + "\n"


def _check_output(out: Path) -> None:
    """``--out`` names a file whose folder exists or can be made (made here)."""
    from .storage import make_folder

    if out.is_dir():
        raise ChestXrayError(f"{out}: --out is a folder; give a file name (e.g. {out / 'predictions.csv'})")
    make_folder(out.parent, "output folder")


def _only_help(args: list[str]) -> bool:
    """Whether the command line only asks for help or the version (no work that an allocator speeds up)."""
    return not args or bool({"--help", "-h", "--version"} & set(args))


def main() -> None:
    """Console-script entry point: first onto the fast allocator (see :mod:`chestxray.allocator`), then the app."""
    from .allocator import ensure_allocator

    if not _only_help(sys.argv[1:]):  # help and version start faster without a second interpreter
        ensure_allocator()
    try:
        app()
    except ChestXrayError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:  # a peer of a distributed launch gone: one line on every surviving rank
        from .launch import peer_lost

        line = peer_lost(err)
        if line is None:
            raise
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(3)


def run() -> None:
    """The ``chestxray`` console script: :func:`main`, then an immediate exit with its status.

    Once a command has finished, Python's teardown of torch, Lightning and onnxruntime takes seconds
    (4-5 s after ``train`` on 2 cores); there is nothing left to finish by then (every file is written
    through a context manager and checkpoints atomically), so logs and standard streams are flushed and
    the process ends at once. An uncaught exception still gets Python's normal exit.
    """
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
