"""Site adaptation (``chestxray adapt``), warm starts, and bundles that remember their training images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import TINY, make_bundle, sets_for
from typer.testing import CliRunner

from chestxray.training import adapt as adapt_module
from chestxray.training.adapt import adapt, cross_fitted, headline
from chestxray.model.bundle import WEIGHTS_FILE, load_bundle, read_meta
from chestxray.stats.logit_transform import KINDS
from chestxray.cli import app
from chestxray.training.config import TrainConfig
from chestxray.errors import ChestXrayError
from chestxray.inference.evaluation import evaluate
from chestxray.inference.predict import load_model, predict_paths
from chestxray.provenance import file_sha256
from chestxray.data.sources import load_samples
from chestxray.training.train import fit, initial_model


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """A bundle with an OOD guard and conformal sets at 80% coverage (fitted on made-up held-out outputs)."""
    return make_bundle(tmp_path / "parent", conformal=sets_for(0.6, coverage=0.8))


@pytest.fixture
def local(make_folder) -> Path:
    return make_folder({"normal": 8, "pneumonia": 8}, root="site")


def test_recalibrate_changes_the_calibration_not_the_weights_and_keeps_lineage(parent: Path, local: Path,
                                                                              tmp_path: Path) -> None:
    result = adapt(parent, local, tmp_path / "child", folds=4, n_boot=50, progress=False)
    child, parent_meta = read_meta(result.bundle_dir), read_meta(parent)
    assert file_sha256(result.bundle_dir / WEIGHTS_FILE) == file_sha256(parent / WEIGHTS_FILE)
    assert child.calibration["kind"] in KINDS and child.operating_points
    lineage = child.lineage
    assert lineage["mode"] == "recalibrate" and lineage["parent_id"] == parent_meta.model_id
    assert lineage["parent_weights_sha256"] == file_sha256(parent / WEIGHTS_FILE)
    assert lineage["class_counts"] == {"normal": 8, "pneumonia": 8} and lineage["n_images"] == 16
    assert len(lineage["data_fingerprint"]) == 24 and lineage["date"]
    # the OOD guard's reference scores now include the 16 local images
    assert len(np.frombuffer(__import__("base64").b64decode(child.ood["held_out"]["float32"]), "<f4")) == \
        len(np.frombuffer(__import__("base64").b64decode(parent_meta.ood["held_out"]["float32"]), "<f4")) + 16
    # the trust parts are the site's: conformal sets at the parent's coverage, drift reference, estimate
    assert child.conformal["counts"] == {"normal": 8, "pneumonia": 8} and "local images" in child.conformal["fitted_on"]
    assert child.conformal["coverage"] == parent_meta.conformal["coverage"] == 0.8
    assert child.extra["reference"]["n"] == 16 and set(child.extra["reference"]["predicted_shares"]) == \
        {"normal", "pneumonia"} and "referral_rate" in child.extra["reference"]
    assert child.extra["validation"]["accuracy"] == result.summary["after"]["accuracy"]
    assert "4-fold estimate inside 16 local images" in child.extra["validation"]["note"]
    card = (result.bundle_dir / "MODEL_CARD.md").read_text()
    assert "## Site adaptation" in card and parent_meta.model_id in card and lineage["data_fingerprint"] in card
    assert child.logit_transform().describe() in card
    summary = json.loads((result.bundle_dir / "adaptation.json").read_text())
    assert summary["n"] == 16 and summary["folds"] == 4 and set(summary["before"]) >= {"accuracy", "ece", "ci"}
    assert set(summary["after"]["sensitivity"]) == {"normal", "pneumonia"}
    # coverage of the parent's prediction sets and of the sets refitted out of fold, on the same images
    sets = summary["conformal"]
    assert sets["target"] == 0.8 and sets["before"] is not None and 0 <= sets["after"]["coverage"] <= 1
    assert set(sets["after"]["per_class"]) == {"normal", "pneumonia"}
    assert any(line.startswith("prediction sets (target coverage 80%): before ") for line in headline(result))
    assert "Site adaptation" in (result.bundle_dir / "adaptation.html").read_text()
    # predictions name the adaptation; the probabilities follow the new calibration
    predictor = load_model(result.bundle_dir)
    table = predict_paths(predictor, [str(local)], progress=False)
    assert table["adaptation"].str.contains("site-adapted \\(recalibrate\\) on 16 local images").all()
    logits = predictor.forward_arrays(np.stack([predictor.prepare(f) for f in table["file"]]))[0]
    expected = predictor.calibration.probabilities(logits)
    assert np.allclose(table[["normal", "pneumonia"]].to_numpy(), expected, atol=5e-5)  # the table rounds to 4 decimals


def test_the_same_local_data_gives_the_same_fingerprint_whatever_the_file_names(parent: Path, make_folder,
                                                                               tmp_path: Path) -> None:
    a = make_folder({"normal": 5, "pneumonia": 5}, root="a")
    b = make_folder({"normal": 5, "pneumonia": 5}, root="b", name=lambda c, i: f"renamed_{c}{i}")
    one = adapt(parent, a, tmp_path / "one", folds=2, n_boot=20, progress=False)
    two = adapt(parent, b, tmp_path / "two", folds=2, n_boot=20, progress=False)
    assert one.summary["lineage"]["data_fingerprint"] == two.summary["lineage"]["data_fingerprint"]


def test_cross_fitted_never_scores_an_image_it_was_fitted_on() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (30, 4, 4)).astype(np.uint8)
    targets = np.repeat([0, 1, 2], 10)
    groups = np.repeat(np.arange(15), 2)  # two images per patient
    fitted_on: list[set[bytes]] = []
    scored: list[set[bytes]] = []

    def fit(items, y):
        fitted_on.append({image.tobytes() for image in items[0]})
        return len(fitted_on) - 1

    def predict(fold, items):
        scored.append({image.tobytes() for image in items[0]})
        assert not scored[-1] & fitted_on[fold], "a held-out image was in the fit"
        return np.full((len(items[0]), 3), 1 / 3)

    probs, fold_of = cross_fitted((images, groups), targets, groups, 5, 0, fit, predict)
    assert len(fitted_on) == 5 and probs.shape == (30, 3) and (fold_of >= 0).all()
    all_images = {image.tobytes() for image in images}
    assert set().union(*scored) == all_images and sum(map(len, scored)) == 30  # each image scored once
    for fold in range(5):
        held = np.flatnonzero(fold_of == fold)
        assert not set(groups[held]) & set(groups[fold_of != fold])  # a patient's images stay in one fold


def test_adapt_fits_each_fold_without_its_images_and_the_child_on_all(parent: Path, local: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[set[bytes]] = []
    fold_fit, child_fit = adapt_module.local_transform, adapt_module.site_calibration

    def spy_fold(logits, targets, groups=None, **kwargs):
        calls.append({row.tobytes() for row in np.asarray(logits)})
        return fold_fit(logits, targets, groups, **kwargs)

    def spy_child(meta, logits, *args, **kwargs):
        calls.append({row.tobytes() for row in np.asarray(logits)})
        return child_fit(meta, logits, *args, **kwargs)

    monkeypatch.setattr(adapt_module, "local_transform", spy_fold)
    monkeypatch.setattr(adapt_module, "site_calibration", spy_child)
    adapt(parent, local, tmp_path / "child", folds=4, n_boot=20, progress=False)
    *folds, final = calls
    assert len(folds) == 4 and len(final) == 16
    held_out = [final - fold for fold in folds]
    assert all(held for held in held_out) and sum(map(len, held_out)) == 16  # the folds partition the sample
    assert set().union(*held_out) == final


@pytest.mark.slow  # trains
def test_finetune_changes_the_weights_and_keeps_lineage(parent: Path, local: Path, tmp_path: Path) -> None:
    overrides = {"epochs": 1, "batch_size": 8, "channels_last": False}
    result = adapt(parent, local, tmp_path / "child", mode="finetune", folds=2, n_boot=20, overrides=overrides,
                   progress=False)
    child = read_meta(result.bundle_dir)
    assert file_sha256(result.bundle_dir / WEIGHTS_FILE) != file_sha256(parent / WEIGHTS_FILE)
    assert child.lineage["mode"] == "finetune" and child.lineage["parent_id"] == read_meta(parent).model_id
    assert child.arch == "test_efficientnet" and child.image_size == 64
    assert result.summary["folds"] == 2 and child.extra["adaptation"]["mode"] == "finetune"
    assert "inner validation split of the local images" in child.conformal["fitted_on"]
    # 12 fine-tuning images are too few for an OOD guard (calibration.MIN_GUARD_IMAGES): none, rather than one
    # that never fires
    assert child.ood is None and child.extra["reference"]["predicted_shares"]


def test_local_classes_the_bundle_does_not_have_are_named(parent: Path, make_folder, tmp_path: Path) -> None:
    data = make_folder({"normal": 6, "pneumonia": 6, "covid": 6, "tb": 5}, root="other")
    result = CliRunner().invoke(app, ["adapt", str(parent), str(data), "--out", str(tmp_path / "child")])
    assert result.exit_code != 0
    with pytest.raises(ChestXrayError, match="class\\(es\\) covid, tb are not the bundle's"):
        adapt(parent, data, tmp_path / "child", progress=False)


def test_a_missing_class_is_refused_saying_how_to_declare_it_and_a_thin_one_is_pooled(parent: Path, make_folder,
                                                                                     tmp_path: Path) -> None:
    """Before: 3 pneumonia images were refused ("adaptation needs at least 5 per class"), and a class with
    fewer than 9 held-out images entered every prediction set."""
    only_one = make_folder({"normal": 8}, root="one")
    with pytest.raises(ChestXrayError, match="no readable local image of pneumonia.*--site-classes"):
        adapt(parent, only_one, tmp_path / "child", progress=False)
    assert not (tmp_path / "child").exists()
    data = make_folder({"normal": 8, "pneumonia": 3}, root="few")
    result = adapt(parent, data, tmp_path / "child", folds=3, n_boot=20, progress=False)
    assert any("few local images of pneumonia 3" in w and "pooled" in w for w in result.summary["warnings"])
    assert read_meta(result.bundle_dir).conformal["pooled"] == ["pneumonia"]


def test_a_three_class_site_adapts_a_four_class_bundle(tmp_path: Path, make_folder) -> None:
    """A children's hospital has no COVID-19 images: the site declares its classes, and the absent one
    leaves the probabilities and the prediction sets; the others are refitted."""
    classes = ["covid19", "normal", "viral", "bacterial"]
    parent = make_bundle(tmp_path / "parent", classes)
    site = make_folder({"normal": 7, "viral": 6, "bacterial": 6}, root="site3")
    with pytest.raises(ChestXrayError, match="no readable local image of covid19.*--site-classes normal,viral,bacterial"):
        adapt(parent, site, tmp_path / "refused", progress=False)
    declared = ["normal", "viral", "bacterial"]
    with pytest.raises(ChestXrayError, match=r"declared absent .* have local images \(normal 7\)"):
        adapt(parent, site, tmp_path / "refused", progress=False, site_classes=["viral", "bacterial", "covid19"])
    result = adapt(parent, site, tmp_path / "child", folds=3, n_boot=20, progress=False, site_classes=declared)
    child = read_meta(result.bundle_dir)
    assert child.conformal["absent"] == ["covid19"] and child.calibration["absent"] == [0]
    assert child.conformal["counts"] == {"covid19": 0, "normal": 7, "viral": 6, "bacterial": 6}
    table = predict_paths(load_model(result.bundle_dir), [str(site)], progress=False)
    assert (table["covid19"] == 0).all() and not table["label"].eq("covid19").any()
    assert not table["prediction_set"].astype(str).str.contains("covid19").any()
    np.testing.assert_allclose(table[declared].sum(1), 1.0, atol=2e-4)  # 4 decimals each
    cli = CliRunner().invoke(app, ["adapt", str(parent), str(site), "--out", str(tmp_path / "cli"), "--folds", "3",
                                   "--n-boot", "20", "--site-classes", "normal,viral,bacterial"])
    assert cli.exit_code == 0, cli.output


@pytest.mark.slow  # trains a parent, then adapts it three times and suggests labels (2 s quiet, 20 s busy)
def test_unlabeled_adaptation_uses_only_the_site_images(tmp_path: Path, make_folder) -> None:
    """adapt --unlabeled: pseudo-labels, a new classifier layer, weighted sets on the held-out reference,
    and a summary that says what could not be checked without labels."""
    from chestxray.training.adapt_unlabeled import adapt_unlabeled, suggest_labels
    from chestxray.model.bundle import HELD_OUT_FILE, load_held_out

    data = make_folder({"covid19": 12, "normal": 12, "pneumonia": 12}, root="train3")
    run = fit(data, TrainConfig(**{**TINY, "epochs": 1, "val_fraction": 0.4}), out_dir=tmp_path / "runs", name="p",
              progress=False)
    meta = read_meta(run.bundle_dir)
    assert HELD_OUT_FILE in meta.files and load_held_out(run.bundle_dir, meta) is not None
    site = make_folder({"normal": 15, "pneumonia": 15}, root="site_images", suffix=".jpg")
    result = adapt_unlabeled(run.bundle_dir, site, tmp_path / "child", site_classes=["normal", "pneumonia"],
                             progress=False)
    child = read_meta(result.bundle_dir)
    assert child.lineage["mode"] == "unlabeled" and child.lineage["absent_classes"] == ["covid19"]
    assert file_sha256(result.bundle_dir / WEIGHTS_FILE) != file_sha256(run.bundle_dir / WEIGHTS_FILE)
    assert child.conformal["absent"] == ["covid19"] and "weights" in child.conformal
    summary = result.summary
    assert summary["n"] == 30 and summary["after"]["predicted_shares"]["covid19"] == 0
    assert "cannot be measured without labels" in summary["unchecked"]
    assert 0 <= summary["domain_shift"]["domain_auc"] <= 1
    table = predict_paths(load_model(result.bundle_dir, backend="torch"), [str(site)], progress=False)
    assert (table["covid19"] == 0).all()
    # the labels worth asking for: n distinct site images, written as a CSV to fill in
    wanted = suggest_labels(run.bundle_dir, site, 5, tmp_path / "label_these.csv", progress=False)
    assert len(set(wanted["path"])) == 5 and (tmp_path / "label_these.csv").read_text().startswith("path,label,")
    # the suggested images, labelled by a person, join the unlabelled rest; the head's training set is chosen
    # by a k-fold on those labels
    wanted["label"] = ["normal" if "/normal/" in path else "pneumonia" for path in wanted["path"]]
    more = sorted(str(p) for p in site.rglob("*.jpg") if str(p) not in set(wanted["path"]))[:5]
    labelled = pd.concat([wanted[["path", "label"]], pd.DataFrame(
        {"path": more, "label": ["normal" if "/normal/" in p else "pneumonia" for p in more]})])
    labelled.to_csv(tmp_path / "labelled.csv", index=False)
    with_labels = adapt_unlabeled(run.bundle_dir, site, tmp_path / "child2", site_classes=["normal", "pneumonia"],
                                  labels=tmp_path / "labelled.csv", progress=False)
    assert with_labels.summary["labelled_by_a_person"] == 10
    assert with_labels.summary["domain_shift"]["head_fitted_on"]["chosen"] in (
        "labelled images alone", "labels and pseudo-labels")
    pd.DataFrame({"path": [more[0]], "label": ["covid19"]}).to_csv(tmp_path / "absent.csv", index=False)
    with pytest.raises(ChestXrayError, match="declared absent"):
        adapt_unlabeled(run.bundle_dir, site, tmp_path / "child3", site_classes=["normal", "pneumonia"],
                        labels=tmp_path / "absent.csv", progress=False)
    # a bundle without the held-out reference is refused in one line
    old = make_bundle(tmp_path / "old")
    with pytest.raises(ChestXrayError, match="no held-out reference.*--reference"):
        adapt_unlabeled(old, site, tmp_path / "x", progress=False)
    # ... unless labelled images of its own kind stand in for it (--reference)
    reference = make_folder({"normal": 8, "pneumonia": 8}, root="reference")
    from_reference = adapt_unlabeled(old, site, tmp_path / "x", progress=False, reference=reference)
    assert read_meta(from_reference.bundle_dir).lineage["mode"] == "unlabeled"
    assert "weights" in read_meta(from_reference.bundle_dir).conformal


def test_unreadable_local_files_are_counted_named_and_the_rest_used(parent: Path, local: Path,
                                                                    tmp_path: Path) -> None:
    (local / "normal" / "broken.png").write_bytes(b"not an image")
    result = adapt(parent, local, tmp_path / "child", folds=2, n_boot=20, progress=False)
    assert result.summary["n"] == 16 and len(result.summary["unreadable"]) == 1
    assert result.summary["unreadable"][0]["file"].endswith("broken.png")
    assert read_meta(result.bundle_dir).lineage["n_unreadable"] == 1


@pytest.mark.slow  # trains
def test_training_images_are_remembered_and_warned_about(make_folder, tmp_path: Path) -> None:
    data = make_folder({"normal": 8, "pneumonia": 8}, root="train")
    run = fit(data, TrainConfig(**TINY), out_dir=tmp_path / "runs", name="r", progress=False)
    meta = read_meta(run.bundle_dir)
    assert meta.seen_images["n_train"] + meta.seen_images["n_val"] == 16
    assert meta.calibration["kind"] in ("none", "temperature", "vector")
    assert meta.temperature >= 1.0  # never sharpened on the training distribution's held-out images
    result = evaluate(run.bundle_dir, data, tmp_path / "eval", n_boot=20, cam_gallery=0, progress=False)
    assert any("16 of the 16 evaluated images were this model's training" in w for w in result.warnings)
    assert json.loads(result.files["metrics"].read_text())["seen_images"]["n_training_images"] == 12
    adapted = adapt(run.bundle_dir, data, tmp_path / "child", folds=2, n_boot=20, progress=False)
    assert any("the local sample is this model's training data" in w for w in adapted.summary["warnings"])
    fresh = make_folder({"normal": 5, "pneumonia": 5}, root="fresh",
                        name=lambda c, i: f"new_{c}_{i}")  # same pixels as the first images of "train"
    check = evaluate(run.bundle_dir, fresh, tmp_path / "eval2", n_boot=20, cam_gallery=0, progress=False)
    assert check.warnings  # same content under other names is still recognised


@pytest.mark.slow  # trains one epoch from the parent (5-6 s on shared cores, over the fast tier's limit)
def test_warm_start_copies_the_parent_and_records_it(parent: Path, make_folder, tmp_path: Path) -> None:
    data = make_folder({"normal": 6, "pneumonia": 6}, root="more")
    config = TrainConfig(**{**TINY, "init": str(parent)})
    samples = load_samples(data)
    model = initial_model(config, samples)
    parent_model, _ = load_bundle(parent)
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), parent_model.state_dict().values()))
    run = fit(data, config, out_dir=tmp_path / "runs", name="warm", progress=False)
    meta = read_meta(run.bundle_dir)
    assert meta.arch == "test_efficientnet" and meta.image_size == 64  # taken from the parent
    assert meta.lineage["mode"].startswith("warm start") and meta.lineage["parent_id"] == read_meta(parent).model_id
    other = make_folder({"a": 4, "b": 4, "c": 4}, root="abc")
    fresh_head = initial_model(config, load_samples(other))
    assert fresh_head.num_classes == 3  # backbone from the parent, a new classifier for other classes


def test_model_endpoint_shows_the_adaptation(parent: Path, local: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from chestxray.serving.serve import create_app

    result = adapt(parent, local, tmp_path / "child", folds=2, n_boot=20, progress=False)
    with TestClient(create_app(load_model(result.bundle_dir))) as client:
        body = client.get("/v1/model").json()
    assert body["lineage"]["parent_id"] == read_meta(parent).model_id
    assert body["adaptation"].startswith("site-adapted (recalibrate)")


@pytest.mark.slow  # exports ONNX
def test_recalibrate_copies_the_parents_graph_checked_and_recorded(parent: Path, local: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from chestxray.deploy.export import export_onnx

    export_onnx(parent)
    result = adapt(parent, local, tmp_path / "child", folds=2, n_boot=20, progress=False)
    files = json.loads((result.bundle_dir / "model.json").read_text())["files"]
    assert files["model.onnx"] == file_sha256(parent / "model.onnx") == file_sha256(result.bundle_dir / "model.onnx")
    assert load_model(result.bundle_dir, backend="onnx").backend == "onnx"
    changed = Path(shutil.copytree(parent, tmp_path / "changed"))
    with open(changed / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ChestXrayError, match="model.onnx: sha256 .* differs"):
        adapt(changed, local, tmp_path / "child2", folds=2, n_boot=20, progress=False)


def test_the_head_choice_folds_train_on_most_labels_and_return_what_they_chose() -> None:
    """choose_head_labels: up to HEAD_CHOICE_FOLDS folds (as the smallest labelled class allows: 10 with 12 a
    class, 3 with 3 a class), and the rows and labels it returns are those of the option it reports."""
    from chestxray.label_free import HEAD_CHOICE_FOLDS, choose_head_labels

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 60)
    features = rng.normal(size=(180, 8)) + 3 * np.eye(3, 8)[truth]
    probs = np.full((180, 3), 1 / 3)
    present = np.ones(3, dtype=bool)
    pseudo = (truth + 1) % 3
    for per_class, folds in ((12, HEAD_CHOICE_FOLDS), (3, 3)):
        known = np.full(180, -1)
        labelled = np.concatenate([np.flatnonzero(truth == k)[:per_class] for k in range(3)])
        known[labelled] = truth[labelled]
        rows, labels, facts = choose_head_labels(probs, features, present, known, pseudo)
        assert facts["folds"] == folds and HEAD_CHOICE_FOLDS == 10
        if facts["chosen"] == "labelled images alone":
            assert np.array_equal(np.sort(rows), np.sort(labelled)) and np.array_equal(labels, known[rows])
        else:
            assert len(rows) == 180 and np.array_equal(labels, pseudo)


@pytest.mark.slow  # trains a parent, then adapts its backbone for one epoch (about 5 s quiet)
def test_backbone_adaptation_trains_the_backbone_not_the_head_nor_batch_norm(tmp_path: Path, make_folder) -> None:
    """adapt --unlabeled --backbone-epochs: SHOT-IM changes the backbone's weights, leaves the frozen classifier
    and batch norm's statistics as they were, refits the sets on the run's validation images through the new
    backbone, and refuses without such a reference."""
    import shutil

    import torch

    from chestxray.training.adapt_backbone import adapt_backbone
    from chestxray.training.adapt_unlabeled import adapt_unlabeled, run_reference, site_images

    data = make_folder({"covid19": 12, "normal": 12, "pneumonia": 12}, root="train3")
    run = fit(data, TrainConfig(**{**TINY, "epochs": 1, "val_fraction": 0.4}), out_dir=tmp_path / "runs", name="p",
              progress=False)
    model, meta = load_bundle(run.bundle_dir)
    reference = run_reference(run.bundle_dir, meta)
    assert reference is not None and len(reference) == int(meta.seen_images["n_val"]) > 0
    site_dir = make_folder({"normal": 20, "pneumonia": 20}, root="site_images", suffix=".jpg")
    site = site_images(meta, site_dir, progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    child, record = adapt_backbone(model, site.images, np.array([False, True, True]), epochs=1, batch_size=16)
    after = child.state_dict()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # input untouched
    head_ids = {id(p) for p in model.head_parameters()}
    head = {f"backbone.{name}" for name, p in model.backbone.named_parameters() if id(p) in head_ids}
    assert len(head) == 2
    changed = [name for name in after if after[name].is_floating_point() and not torch.equal(before[name], after[name])]
    assert changed and not set(changed) & head
    assert not any("running_" in name for name in changed)  # batch norm's statistics stay the recipe's
    assert len(record.loss) == 1 and np.isfinite(record.loss[0])
    result = adapt_unlabeled(run.bundle_dir, site_dir, tmp_path / "child", site_classes=["normal", "pneumonia"],
                             progress=False, backbone_epochs=1, onnx=False)
    assert result.summary["backbone"]["epochs"] == 1 and "split.csv" in result.summary["backbone"]["reference"]
    child_model, child_meta = load_bundle(result.bundle_dir)
    grown = [n for n, t in child_model.state_dict().items() if t.is_floating_point() and "running_" not in n
             and not torch.equal(before[n], t) and n not in head]
    assert grown and "weights" in child_meta.conformal
    # the bundle alone, away from its run folder: its validation images are unknown, so a reference is asked for
    alone = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(run.bundle_dir, alone)
    with pytest.raises(ChestXrayError, match="--reference"):
        adapt_unlabeled(alone, site_dir, tmp_path / "child2", progress=False, backbone_epochs=1, onnx=False)
