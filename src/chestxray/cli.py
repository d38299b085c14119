"""The ``chestxray`` command: a thin layer over the Python API.

Every :class:`ChestXrayError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .config import load_config, options_help, overrides_from_args
from .errors import ChestXrayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, explain and serve chest X-ray classifiers. Not a diagnostic device.")
console = Console()
err_console = Console(stderr=True)


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
        from .allocator import active_allocator

        versions = _versions()
        console.print(f"chestxray {versions.pop('chestxray')} ("
                      + ", ".join(f"{name} {v}" for name, v in versions.items())
                      + f"; allocator {active_allocator()})", highlight=False)
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

DataArg = typer.Argument(..., help="A class folder tree, a CSV/TSV manifest (path,label[,patient_id,split]) "
                                   "or a MedMNIST .npz file.")
CacheOpt = typer.Option(None, "--cache-dir", help="Preprocessing cache folder (default: ~/.cache/chestxray).")


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


TRAIN_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (e.g. a sweep's best.yaml); flags win.")
OutOpt = typer.Option(Path("runs"), "--out", help="Parent folder of run directories.")
NameOpt = typer.Option(None, "--name", help="Run name (default: a timestamp).")


def _train_config(config: Optional[Path], ctx: typer.Context):
    """The training config from --config and the command's extra flags."""
    from .launch import world_size

    if ctx.command.name in ("cv", "sweep") and world_size() > 1:
        raise ChestXrayError(f"`chestxray {ctx.command.name}` runs its models one after the other in one "
                             "process: launch it without torchrun")
    return load_config(config, **overrides_from_args(ctx.args))


ONNX_PARITY_IMAGES = 16
"""Validation X-rays on which `train` checks the exported ONNX model against PyTorch."""


@app.command(context_settings=TRAIN_CONTEXT, epilog=options_help())
def train(ctx: typer.Context, data: Path = DataArg, config: Optional[Path] = ConfigOpt, out: Path = OutOpt,
          name: Optional[str] = NameOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue the run --name from its last checkpoint."),
          onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also export the bundle to ONNX (parity-checked "
                                    "on validation X-rays): predict and serve then start fast and run 2-5x faster."),
          cache_dir: Optional[Path] = CacheOpt) -> None:
    """Fine-tune a model on DATA (its test split is never used) and write a run directory and bundle."""
    from .train import fit

    settings = None if resume else _train_config(config, ctx)
    result = fit(data, settings, out_dir=out, name=name, resume=resume, cache_dir=cache_dir)
    if not result.metrics:  # a rank other than 0 of a distributed run
        return
    if onnx:
        from .export import export_onnx
        from .splits import split_files

        validation = split_files(result.run_dir / "split.csv", "val")[:ONNX_PARITY_IMAGES]
        exported = export_onnx(result.bundle_dir, parity_images=validation)
        console.print(f"onnx: {exported.path} (max probability difference {exported.max_prob_diff:.1e} on "
                      f"{exported.n_images} images)", soft_wrap=True)
    console.print(f"bundle: {result.bundle_dir}", soft_wrap=True)


@app.command(context_settings=TRAIN_CONTEXT, epilog=options_help())
def cv(ctx: typer.Context, data: Path = DataArg, folds: int = typer.Option(5, "--folds", "-k"),
       keep_models: bool = typer.Option(False, "--keep-models", help="Save the fold models as one ensemble bundle."),
       config: Optional[Path] = ConfigOpt, out: Path = OutOpt, name: Optional[str] = NameOpt,
       cache_dir: Optional[Path] = CacheOpt) -> None:
    """Stratified, patient-grouped k-fold cross-validation on DATA's training images."""
    from .cv import cross_validate, render_cv

    result = cross_validate(data, _train_config(config, ctx), folds, out_dir=out, name=name,
                            keep_models=keep_models, cache_dir=cache_dir)
    render_cv(result, console)
    console.print(f"results: {result.run_dir}" + (f"\nbundle: {result.bundle_dir}" if result.bundle_dir else ""),
                  soft_wrap=True)


@app.command(context_settings=TRAIN_CONTEXT, epilog=options_help())
def sweep(ctx: typer.Context, data: Path = DataArg, trials: int = typer.Option(20, "--trials", "-n"),
          timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after S seconds."),
          config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with a base config under "
                                                "`train:` and an optional search `space:`."),
          out: Path = OutOpt, name: Optional[str] = NameOpt, cache_dir: Optional[Path] = CacheOpt) -> None:
    """Optuna hyperparameter search with pruning; writes trials.csv and best.yaml (for train --config)."""
    from .sweep import load_space, render_sweep, sweep as run_sweep

    result = run_sweep(data, _train_config(config, ctx), trials, out_dir=out, name=name, timeout=timeout,
                       cache_dir=cache_dir, space=load_space(config) if config else None)
    render_sweep(result, console)
    console.print(f"best config: {result.run_dir / 'best.yaml'}", soft_wrap=True)


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
             batch_size: int = typer.Option(32, "--batch-size"),
             cache_dir: Optional[Path] = CacheOpt) -> None:
    """Metrics with 95% bootstrap intervals, calibration and an HTML report of BUNDLE on DATA.

    Exit 1 if any file was unreadable: named on stderr, left out of the metrics, listed in metrics.json.
    """
    from .evaluate import evaluate as run_evaluate, headline

    result = run_evaluate(bundle, data, out, split=split, n_boot=n_boot, seed=seed, cam_gallery=cam_gallery,
                          batch_size=batch_size, cache_dir=cache_dir, progress=err_console.is_terminal)
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


@app.command()
def predict(bundle: Path = BundleArg,
            inputs: list[str] = typer.Argument(..., help="Image or DICOM files, folders or globs."),
            fmt: str = typer.Option("table", "--format", help="table, csv or json."),
            out: Optional[Path] = typer.Option(None, "--out", help="Write the results to this file."),
            cam: Optional[Path] = typer.Option(None, "--cam", help="Write Grad-CAM overlays (PNG) into this folder."),
            tta: bool = typer.Option(False, "--tta", help="Average over mild test-time augmentations."),
            operating_point: Optional[str] = typer.Option(
                None, "--operating-point",
                help="Add a 'called' column: the classes at or above their threshold at this point, "
                     "chosen on validation (youden, sensitivity_90 or sensitivity_95)."),
            backend: str = typer.Option("auto", help=BACKEND_HELP),
            batch_size: int = typer.Option(32, "--batch-size")) -> None:
    """Predict files, folders and globs; flags out-of-distribution inputs. Exit 1 if any input failed."""
    from .bundle import read_meta
    from .launch import world_size
    from .predict import apply_operating_point, load_model, predict_paths, sharded_predict, write_cams

    if fmt not in ("table", "csv", "json"):
        raise ChestXrayError(f"--format must be table, csv or json, not {fmt!r}")
    if out is not None:  # before predicting: an output that cannot be written must not cost the work
        _check_output(out)
    progress = err_console.is_terminal
    predictor = None
    if world_size() > 1:  # launched by torchrun: each rank predicts its shard, rank 0 gets the whole table
        table = sharded_predict(bundle, inputs, backend=backend, batch_size=batch_size, progress=progress, tta=tta)
        if table is None:  # a rank other than 0
            return
    else:
        predictor = load_model(bundle, backend=backend)
        table = predict_paths(predictor, inputs, batch_size=batch_size, progress=progress, tta=tta)
    if operating_point:
        meta = predictor.meta if predictor is not None else read_meta(bundle)  # a sharded run loads none here
        table = apply_operating_point(table, meta.operating_points, operating_point)
    _write_table(table, fmt, out)
    if cam is not None:
        explainer = predictor if predictor is not None and predictor.backend == "torch" else load_model(bundle)
        written = write_cams(explainer, inputs, cam, progress=progress)  # Grad-CAM needs the torch model
        err_console.print(f"{len(written)} Grad-CAM overlay(s) in {cam}")
    failed = table["error"].notna() & (table["error"] != "")
    if failed.any():
        for file, error in table.loc[failed, ["file", "error"]].itertuples(index=False):
            err_console.print(f"error: {file}: {error}", markup=False, highlight=False, soft_wrap=True)
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
           min_agreement: float = typer.Option(0.99, "--min-agreement",
                                               help="Refuse the INT8 model below this share of labels agreeing "
                                                    "with the FP32 model.")) -> None:
    """Export BUNDLE to ONNX; refuses to write a model whose outputs differ from PyTorch's (INT8: whose
    labels differ from the FP32 model's on more than 1% of real X-rays)."""
    if fmt != "onnx":
        raise ChestXrayError(f"--format {fmt!r} is not supported: use onnx")
    if quantize is None:
        if calibration_data is not None or parity_data is not None:
            raise ChestXrayError("--calibration-data and --parity-data go with --quantize int8")
        from .export import export_onnx

        result = export_onnx(bundle, out, opset=opset, parity_images=parity_images)
        console.print(f"{result.path}: opset {result.opset}, {result.size_bytes / 1e6:.1f} MB, parity on "
                      f"{result.n_images} images: max probability difference {result.max_prob_diff:.1e}",
                      soft_wrap=True)
        return
    if quantize != "int8":
        raise ChestXrayError(f"--quantize {quantize!r} is not supported: use int8")
    if calibration_data is None:
        raise ChestXrayError("--quantize int8 needs --calibration-data: a few hundred of the training images")
    from .quantize import quantize_bundle

    result = quantize_bundle(bundle, calibration_data, out, n_calibration=calibration_images, parity_data=parity_data,
                             min_agreement=min_agreement, opset=opset, parity_images=parity_images,
                             progress=err_console.is_terminal)
    parity = result.parity
    ood = "" if parity.ood_flag_agreement is None else f", OOD flags agree on {parity.ood_flag_agreement:.1%}"
    console.print(f"{result.path}: INT8, {result.size_bytes / 1e6:.1f} MB, calibrated on {result.n_calibration} "
                  f"images; parity on {parity.n_images} other real X-rays: labels agree on "
                  f"{parity.label_agreement:.1%}, max probability difference {parity.max_prob_diff:.3f}{ood}",
                  soft_wrap=True)


@app.command()
def serve(bundle: Path = BundleArg,
          host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000),
          backend: str = typer.Option("auto", help=BACKEND_HELP),
          workers: int = typer.Option(1, help="Server processes, each with its own model."),
          threads: Optional[int] = typer.Option(None, help="Compute threads per worker (default: cores / workers)."),
          max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted upload."),
          max_per_client: int = typer.Option(32, "--max-connections-per-client",
                                             help="Open connections allowed from one address (raise it behind "
                                                  "a reverse proxy).")) -> None:
    """REST API (POST /v1/predict) and a web page for BUNDLE. Set CHESTXRAY_API_KEY to require a key."""
    from .serve import serve as run_server

    run_server(bundle, host, port, backend, workers=workers, threads=threads,
               max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_per_client=max_per_client)


def _figure(value: float | None, spec: str) -> str:
    """``value`` formatted, or "n/a" when missing."""
    return "n/a" if value is None or value != value else format(value, spec)


def _write_table(table, fmt: str, out: Optional[Path]) -> None:
    """CSV or JSON with every column; the table view shows one line per file (all columns go to --out)."""
    if fmt == "table":
        from rich.table import Table

        called = "called" in table.columns
        view = Table("file", "label", *(["called"] if called else []), "probability", "unusual (score, percentile)",
                     "error")
        for row in table.itertuples(index=False):
            error = row.error if isinstance(row.error, str) else ""
            probability = f"{getattr(row, row.label):.3f}" if row.label in table.columns else ""
            ood = "" if error else f"{'YES' if row.ood else 'no'} ({_figure(row.ood_score, '.1f')}, " \
                                   f"{_figure(row.ood_percentile, '.0f')}%)"
            label = f"[yellow]not a chest X-ray like the training images[/] ({row.label}?)" if row.ood else row.label
            view.add_row(Path(row.file).name, label, *([row.called] if called else []), probability, ood, error)
        console.print(view)
    else:
        text = table.to_csv(index=False) if fmt == "csv" else table.to_json(orient="records", indent=2)
        if out is None:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        from .storage import atomic_path

        with atomic_path(out) as tmp:
            table.to_json(tmp, orient="records", indent=2) if fmt == "json" else table.to_csv(tmp, index=False)
        err_console.print(f"results: {out}")


def _check_output(out: Path) -> None:
    """``--out`` names a file whose folder exists or can be made (made here)."""
    from .storage import make_folder

    if out.is_dir():
        raise ChestXrayError(f"{out}: --out is a folder; give a file name (e.g. {out / 'predictions.csv'})")
    make_folder(out.parent, "output folder")


def main() -> None:
    """Console-script entry point: first onto the fast allocator (see :mod:`chestxray.allocator`), then the app."""
    from .allocator import ensure_allocator

    ensure_allocator()
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
