"""Adapting from the map (issue 13): examples from a labelled layer, the split by polygon, the instant methods
checked against numpy, the train job's bad input, cancel and resume."""
from __future__ import annotations

import warnings

import numpy as np
import pyogrio
import pytest
import shapely
import torch

from backend.adapt.examples import ExampleError, build_examples, export_image_folder
from backend.adapt.job import run_train
from backend.adapt.scene import PALETTE, make_scene
from backend.adapt.split import groups_on_both_sides, split_by_group
from backend.adapt.store import AdapterStore
from backend.server import Job
from backend.tasks import classify as classify_task
from shared_protocol import ErrorCode, ProtocolError, Request
from shared_protocol.defaults import ADAPT_TEMPLATES
from shared_protocol.messages import decode_request

CHIP = 32


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scene"), n_classes=3, grid=6, cell=64, border=16)


@pytest.fixture(scope="module")
def examples(scene):
    return build_examples(scene.raster, scene.labels, "landcover", chip_size=CHIP, max_per_example=4)


def make_job(params, arrays, on_progress=None):
    req = decode_request(Request("train", "job-1", params, arrays).encode())
    job = Job(req, b"peer", lambda peer, reply: on_progress and on_progress(job, reply))
    return job


def job_arrays(ex):
    return {"chips": ex.chips, "labels": ex.labels, "groups": ex.groups, "held_out": ex.held_out.astype(np.uint8)}


def train(engine, store, ex, method, name, info=None, on_progress=None, **params):
    job = make_job({"name": name, "method": method, "classes": ex.classes, **params}, job_arrays(ex), on_progress)
    return run_train(engine, store, {} if info is None else info, job)


# -- examples ------------------------------------------------------------------------------------------------
def test_split_never_puts_one_example_on_both_sides(rng):
    labels = rng.integers(0, 4, 500)
    groups = np.array([int(k) * 100 + int(g) for k, g in zip(labels, rng.integers(0, 7, 500), strict=True)])
    held = split_by_group(labels, groups, 0.3, seed=3)
    assert groups_on_both_sides(groups, held) == []
    for c in range(4):
        ids = np.unique(groups[labels == c])
        n_held = len(np.unique(groups[(labels == c) & held]))
        assert 1 <= n_held < len(ids)  # some, never all, of each class's examples are held out


def test_examples_come_from_their_polygons(scene, examples):
    ex = examples
    assert ex.chips.shape[1:] == (CHIP, CHIP, 3) and ex.chips.dtype == np.uint8
    assert groups_on_both_sides(ex.groups, ex.held_out) == []
    assert set(np.unique(ex.groups[ex.held_out])).isdisjoint(np.unique(ex.groups[~ex.held_out]))
    # the labels were in EPSG:4326: a chip lands in its polygon when its colour is its class's tint
    palette = np.array(PALETTE[:len(ex.classes)], float)
    order = [list(("forest", "water", "farmland")).index(c) for c in ex.classes]
    means = ex.chips.reshape(len(ex.chips), -1, 3).mean(axis=1)
    tint = means / means.sum(axis=1, keepdims=True)
    ref = palette[order] / palette[order].sum(axis=1, keepdims=True)
    nearest = np.argmin(((tint[:, None] - ref[None]) ** 2).sum(-1), axis=1)
    assert (nearest == ex.labels).mean() == 1.0
    counts = ex.counts()
    assert sum(r["train"] + r["held_out"] for r in counts.values()) == len(ex.chips)


def test_export_is_an_image_folder_the_trainer_reads(tmp_path, examples):
    from backend.training.data import read_image_folder
    root = export_image_folder(examples, tmp_path / "ds")
    data = read_image_folder(root / "train", shots=None, val_root=root / "val")
    assert data.classes == sorted(examples.classes)
    assert len(data.train) == int((~examples.held_out).sum()) and len(data.held_out) == int(examples.held_out.sum())
    with pytest.raises(ExampleError, match="not an empty folder"):
        export_image_folder(examples, root)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def write_layer(path, geoms, values, field="cls", crs="EPSG:32618", geometry_type="Unknown", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyogrio.raw.write(str(path), shapely.to_wkb(np.array(geoms, dtype=object)),
                          [np.array(values, dtype=object)], [field], crs=crs, geometry_type=geometry_type, **kw)
    return path


def cell(scene, r, c, shrink=0.0):
    """The scene's polygon (r, c) in UTM, optionally shrunk."""
    from backend.adapt.scene import ORIGIN
    size = scene.cell * scene.pixel
    x0 = ORIGIN[0] + (16 + c * scene.cell) * scene.pixel + shrink
    y1 = ORIGIN[1] - (16 + r * scene.cell) * scene.pixel - shrink
    return shapely.box(x0, y1 - size + 2 * shrink, x0 + size - 2 * shrink, y1)


@pytest.mark.parametrize("case,match", [
    ("one example", "at least 2 chips"),
    ("no features", "no features"),
    ("no class field", "no field 'cls'"),
    ("outside", "outside the raster"),
    ("all outside", "no labelled feature overlaps"),
    ("crs mismatch", "CRS mismatch"),
    ("no crs", "no CRS"),
    ("non-ascii", "ASCII"),
    ("duplicate names", "same name"),
    ("overlap", "overlap"),
    ("one class", "only one class"),
])
def test_bad_labels_get_a_clear_message(tmp_path, scene, case, match):
    a, b = cell(scene, 0, 0), cell(scene, 0, 1)
    path = tmp_path / "l.gpkg"
    far = shapely.box(0, 0, 100, 100)
    kw = {}
    if case == "one example":
        layers = ([a, shapely.Point(b.centroid.x, b.centroid.y)], ["x", "y"])
    elif case == "no features":
        layers = ([], [])
        kw["geometry_type"] = "Polygon"
    elif case == "no class field":
        write_layer(path, [a, b], ["x", "y"], field="other")
        layers = None
    elif case == "outside":
        layers = ([a, b, far], ["x", "y", "y"])
    elif case == "all outside":
        layers = ([far], ["x"])
    elif case == "crs mismatch":  # UTM coordinates declared as degrees
        write_layer(path, [a, b], ["x", "y"], crs="EPSG:4326")
        layers = None
    elif case == "no crs":
        path = tmp_path / "l.shp"
        write_layer(path, [a, b], ["x", "y"], crs=None)
        layers = None
    elif case == "non-ascii":
        layers = ([a, b], ["forêt", "y"])
    elif case == "duplicate names":
        layers = ([a, b], ["Bare_soil", "bare soil"])
    elif case == "overlap":
        layers = ([a, b, cell(scene, 0, 0, shrink=100)], ["x", "y", "y"])
    else:
        layers = ([a, b], ["x", "x"])
    if layers is not None:
        write_layer(path, *layers, **kw)
    with pytest.raises(ExampleError, match=match):
        build_examples(scene.raster, path, "cls", chip_size=CHIP, max_per_example=4)


def test_features_outside_can_be_skipped_and_polygons_sharing_an_edge_are_fine(tmp_path, scene):
    a, b, c = cell(scene, 0, 0), cell(scene, 0, 1), cell(scene, 1, 0)
    touching = shapely.box(a.bounds[2], a.bounds[1], a.bounds[2] + 300, a.bounds[3])
    path = write_layer(tmp_path / "l.gpkg", [a, b, c, touching, shapely.box(0, 0, 50, 50)], ["x", "y", "x", "y", "x"])
    ex = build_examples(scene.raster, path, "cls", chip_size=CHIP, max_per_example=4, skip_outside=True)
    assert ex.classes == ["x", "y"] and any("outside the raster" in w for w in ex.warnings)


# -- the instant methods against numpy -------------------------------------------------------------------------
def numpy_embeddings(engine, chips):
    return engine.encode_images(chips).cpu().numpy().astype(np.float64)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_instant_cache_logits_are_tip_adapter_recomputed_with_numpy(tmp_path, engine, examples):
    ex, store = examples, AdapterStore(tmp_path)
    reply = train(engine, store, ex, "instant-cache", "cache")
    saved = torch.load(tmp_path / "cache.pt", weights_only=True)
    cfg, t = saved["header"]["config"], {k: v.double().numpy() for k, v in saved["tensors"].items()}
    f = numpy_embeddings(engine, ex.chips)
    train_f = f[~ex.held_out]
    mean = train_f.mean(axis=0) if reply.result["tuning"]["centre"] else np.zeros(f.shape[1])
    keys = (train_f - mean) / np.linalg.norm(train_f - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(t["keys"], keys, atol=1e-5)
    np.testing.assert_array_equal(t["values"].argmax(axis=1), ex.labels[~ex.held_out])
    text = classify_task.class_vectors(engine, ex.classes, {"templates": ADAPT_TEMPLATES}).cpu().numpy()
    np.testing.assert_allclose(t["text"], text, atol=1e-6)
    g = (f - mean) / np.linalg.norm(f - mean, axis=1, keepdims=True)
    logits = 100 * f @ text.T + cfg["alpha"] * np.exp(-cfg["beta"] * (1 - g @ keys.T)) @ t["values"]
    _, arrays = classify_task.classify(engine, {"classes": ex.classes, "adapter": "cache", "top_k": 1},
                                       {"tiles": ex.chips}, lambda p, m: None)
    np.testing.assert_allclose(arrays["probs"], softmax(logits), atol=2e-4)
    # classes in another order, or a subset, are the same columns
    sub = [ex.classes[2], ex.classes[0]]
    _, arrays2 = classify_task.classify(engine, {"classes": sub, "adapter": "cache", "top_k": 1},
                                        {"tiles": ex.chips[:5]}, lambda p, m: None)
    np.testing.assert_allclose(arrays2["probs"], softmax(logits[:5][:, [2, 0]]), atol=2e-4)
    held = ex.held_out
    acc = 100 * float((logits[held].argmax(axis=1) == ex.labels[held]).mean())
    assert reply.result["metrics"]["adapted"]["top1"] == pytest.approx(acc)
    assert acc >= 90.0


def test_linear_probe_logits_recomputed_with_numpy_and_the_fit_lowers_its_objective(tmp_path, engine, examples):
    ex, store = examples, AdapterStore(tmp_path)
    reply = train(engine, store, ex, "linear-probe", "probe")
    saved = torch.load(tmp_path / "probe.pt", weights_only=True)
    w, b = (saved["tensors"][k].double().numpy() for k in ("weight", "bias"))
    f = numpy_embeddings(engine, ex.chips)
    logits = f @ w.T + b
    _, arrays = classify_task.classify(engine, {"classes": ex.classes, "adapter": "probe", "top_k": 1},
                                       {"tiles": ex.chips}, lambda p, m: None)
    np.testing.assert_allclose(arrays["probs"], softmax(logits), atol=2e-4)
    # the probe starts from the zero-shot classifier and lowers cross-entropy on the training chips
    text = classify_task.class_vectors(engine, ex.classes, {"templates": ADAPT_TEMPLATES}).cpu().numpy()
    tr, y = ~ex.held_out, ex.labels[~ex.held_out]

    def ce(lg):
        return float(-np.log(softmax(lg)[np.arange(len(y)), y]).mean())
    assert ce(logits[tr]) < ce(100 * f[tr] @ text.T)
    acc = 100 * float((logits[ex.held_out].argmax(axis=1) == ex.labels[ex.held_out]).mean())
    assert reply.result["metrics"]["adapted"]["top1"] == pytest.approx(acc) and acc >= 90.0
    zs = reply.result["metrics"]["zero_shot"]
    assert zs["n"] == int(ex.held_out.sum()) and np.array(zs["confusion"]).sum() == zs["n"]


def test_margin_is_top1_minus_top2(engine, examples):
    result, arrays = classify_task.classify(engine, {"classes": examples.classes, "top_k": 3},
                                            {"tiles": examples.chips[:10]}, lambda p, m: None)
    p = np.sort(arrays["probs"], axis=1)
    np.testing.assert_allclose([t["margin"] for t in result["tiles"]], p[:, -1] - p[:, -2], atol=1e-6)


# -- the job: bad input, names, cancel, resume --------------------------------------------------------------
def test_bad_examples_are_refused_before_any_work(tmp_path, engine, examples):
    store = AdapterStore(tmp_path)
    ex = examples
    one = job_arrays(ex)
    one["labels"] = np.where(np.arange(len(ex.labels)) == 0, 2, np.minimum(ex.labels, 1)).astype(np.int32)
    one["groups"] = np.arange(len(ex.labels), dtype=np.int32)
    one.pop("held_out")
    cases = {
        "too_few_examples": one,
        "split_leaks": {**job_arrays(ex), "held_out": (np.arange(len(ex.labels)) % 2).astype(np.uint8)},
    }
    for reason, arrays in cases.items():
        job = make_job({"name": "bad", "method": "instant-cache", "classes": ex.classes}, arrays)
        with pytest.raises(ProtocolError) as e:
            run_train(engine, store, {}, job)
        assert e.value.code == ErrorCode.BAD_PARAMS and e.value.details["reason"] == reason, e.value
    job = make_job({"name": "bad", "method": "instant-cache", "classes": ["Forest", "forest", "x"]}, job_arrays(ex))
    with pytest.raises(ProtocolError, match="same once normalised"):
        run_train(engine, store, {}, job)
    assert list(tmp_path.iterdir()) == [] and "bad" not in engine.adapters


def test_an_existing_name_is_refused_unless_overwrite(tmp_path, engine, examples):
    store, info = AdapterStore(tmp_path), {}
    train(engine, store, examples, "linear-probe", "same", info)
    before = (tmp_path / "same.pt").read_bytes()
    with pytest.raises(ProtocolError) as e:
        train(engine, store, examples, "instant-cache", "same", info)
    assert e.value.details["reason"] == "adapter_exists"
    assert (tmp_path / "same.pt").read_bytes() == before and info["same"]["method"] == "linear-probe"
    train(engine, store, examples, "instant-cache", "same", info, overwrite=True)
    assert info["same"]["method"] == "instant-cache" and engine.adapters["same"].method == "instant-cache"


def test_a_cancelled_job_registers_nothing_and_resumes_from_its_checkpoint(tmp_path, engine, examples):
    store, info = AdapterStore(tmp_path), {}
    seen, cancelled_in = [], []

    def cancel_in_epoch_2(job, reply):  # progress is rate-limited: the first message of epoch 2 or later
        seen.append(reply.message)
        epoch = int(reply.message.split()[1].split("/")[0]) if reply.message.startswith("epoch ") else 0
        if epoch >= 2 and not cancelled_in:
            cancelled_in.append(epoch)
            job.cancelled.set()

    with pytest.raises(ProtocolError) as e:
        train(engine, store, examples, "coop", "cx", info, on_progress=cancel_in_epoch_2, epochs=5, batch_size=8)
    assert e.value.code == ErrorCode.CANCELLED
    assert "cx" not in engine.adapters and "cx" not in info and not (tmp_path / "cx.pt").exists()
    assert not engine.loaded.model.training
    assert list((tmp_path / ".jobs").glob("cx-coop-*/checkpoint.pt"))
    reply = train(engine, store, examples, "coop", "cx", info, epochs=5, batch_size=8, resume=True)
    assert reply.result["tuning"]["resumed_from_epoch"] == cancelled_in[0] - 1 >= 1
    assert [h["epoch"] for h in reply.result["tuning"]["history"]] == [0, 1, 2, 3, 4, 5]
    assert "cx" in engine.adapters and (tmp_path / "cx.pt").is_file()
    assert not list((tmp_path / ".jobs").glob("cx-coop-*"))  # a finished job leaves no checkpoint behind
    assert any("val" in m for m in seen)


def test_saved_adapters_carry_their_provenance_and_random_ones_are_not_reloaded(tmp_path, tiny, engine, examples):
    store = AdapterStore(tmp_path)
    train(engine, store, examples, "instant-cache", "again", provenance={"raster": "scene.tif"})
    (tmp_path / ".again.pt.1234.part").write_bytes(b"half")  # an interrupted write
    from backend.adapters import describe_adapter
    extra = describe_adapter(tmp_path / "again.pt")["extra"]
    assert extra["classes"] == examples.classes and extra["metrics"]["adapted"]["top1"] >= 90
    adapt = extra["adapt"]
    assert adapt["base_model"] == "tiny" and adapt["method"] == "instant-cache" and len(adapt["examples_sha256"]) == 64
    assert adapt["provenance"] == {"raster": "scene.tif"} and adapt["date"] and adapt["base_random_weights"]
    models, info = AdapterStore(tmp_path).load_all(tiny)  # a new process would draw other random weights
    assert models == {} and not (tmp_path / ".again.pt.1234.part").exists()


def test_without_a_folder_the_adapter_is_served_until_the_server_stops(engine, examples):
    info = {}
    reply = train(engine, None, examples, "linear-probe", "memory", info)
    assert reply.result["path"] is None and "memory" in engine.adapters and info["memory"]["path"] is None
    _, arrays = classify_task.classify(engine, {"classes": examples.classes, "adapter": "memory", "top_k": 1},
                                       {"tiles": examples.chips[examples.held_out]}, lambda p, m: None)
    acc = 100 * float((arrays["probs"].argmax(axis=1) == examples.labels[examples.held_out]).mean())
    assert acc == pytest.approx(reply.result["metrics"]["adapted"]["top1"])
