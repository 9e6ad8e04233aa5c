"""predict.py: new images -> label maps in their own geometry, exactly what 05 --save_nifti writes; the training
preprocessing repeated bit for bit (CT, --spacing); bad input (channels off the first channel's grid too) fails the
case, not the run; every file under --input is a case, a listed skip, or a refusal naming it."""
import glob
import gzip
import json
import os
import re
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from common.data import case_geometry, read_meta, slices_to_nifti
from common.iac import write_genotype
from common.phantom import write_phantom
from common.raw import Case, DataError, DatasetInfo, image_cases, load_case, load_images
from common.utils import InputError
from conftest import data_args, load_script

# a light cell (pools, skips and one dilated conv): stage III in seconds on the CPU
GENO = {"edges": [["skip_connect", 0, 2], ["max_pool_3x3", 1, 2], ["avg_pool_3x3", 0, 3], ["skip_connect", 2, 3],
                  ["dil_conv_3x3", 1, 4], ["skip_connect", 3, 4], ["avg_pool_3x3", 2, 5], ["skip_connect", 4, 5]],
        "concat": [2, 3, 4, 5]}


@pytest.fixture(scope="module")
def predict():
    return load_script("predict")


@pytest.fixture(scope="module")
def iac_run(tmp_path_factory, scripts, acdc, backbone):
    """A stage III run: the cell of a fixed genotype in the frozen backbone, one epoch."""
    base = tmp_path_factory.mktemp("iac")
    search, out = base / "search", str(base / "run")
    search.mkdir()
    write_genotype(str(search / "genotype.json"), GENO, {"mode": "full", "epochs_run": 1, "seconds": 1.0,
                                                         "encoder": "base", "dataset": "acdc"})
    f = scripts["04_finetune"]
    f.main(f.get_args(["--backbone", os.path.join(backbone, "ckpt_best.pt"), "--genotype",
                       str(search / "genotype.json"), *data_args(acdc), "--epochs", "1", "--batch_size", "16",
                       "--init", "fresh", "--allow_unfinished", "--out", out]))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, scripts, acdc, backbone, iac_run):
    """05_evaluate.py --save_nifti of both runs on the test split -> {run name: its NIfTI folder}."""
    base = tmp_path_factory.mktemp("eval")
    e = scripts["05_evaluate"]
    e.main(e.get_args([*data_args(acdc), "--run", f"ref={backbone}", "--run", f"iac={iac_run}", "--out",
                       str(base / "eval"), "--save_nifti", str(base / "nii"), "--n_boot", "99"]))
    return {"ref": str(base / "nii" / "ref_base_seed0"), "iac": str(base / "nii" / "iac_base_seed0")}


def split_cases(acdc):
    return json.load(open(os.path.join(acdc[1], "splits.json")))["test"]


def assert_same_nifti(a, b):
    x, y = nib.load(a), nib.load(b)
    assert x.shape == y.shape and x.get_data_dtype() == y.get_data_dtype(), (a, b)
    np.testing.assert_array_equal(x.affine, y.affine)
    np.testing.assert_array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj))


def test_predict_equals_what_05_saves(tmp_path, capsys, predict, acdc, backbone, iac_run, saved):
    """The test patients' raw folders (images beside their _gt labels and 4-D cine files) through predict.py give,
    for a stage I and a stage III run, exactly 05's --save_nifti files, and the labels and 4-D files are listed as
    skipped (a line, and each with its reason in predict.json); a single file gives its one case."""
    cases = split_cases(acdc)
    new = tmp_path / "new"
    new.mkdir()
    for patient in sorted({c.split("_frame")[0] for c in cases}):
        shutil.copytree(glob.glob(os.path.join(acdc[0], "*", patient))[0], new / patient)
    assert glob.glob(str(new / "*" / "*_gt.nii.gz")) and glob.glob(str(new / "*" / "*_4d.nii.gz"))
    for name, run in (("ref", backbone), ("iac", iac_run)):
        out = tmp_path / f"pred_{name}"
        predict.main(predict.get_args(["--run", run, "--input", str(new), "--out", str(out), "--device", "cpu"]))
        assert sorted(os.listdir(out)) == sorted([f"{c}.nii.gz" for c in cases] + ["predict.json"])
        for c in cases:
            assert_same_nifti(out / f"{c}.nii.gz", os.path.join(saved[name], f"{c}.nii.gz"))
        record = json.load(open(out / "predict.json"))
        assert record["failed"] == {} and record["data"] == data_args(acdc)[1]     # found through RUN/args.json
        left = sorted(glob.glob(str(new / "*" / "*_gt.nii.gz")) + glob.glob(str(new / "*" / "*_4d.nii.gz")))
        assert sorted(record["skipped"]) == left
        assert {record["skipped"][f] for f in left} == {"a label file (_gt)", "a 4-D series (_4d)"}
        assert f"skipped {len(left)} file(s)" in capsys.readouterr().out
    one = tmp_path / "one"
    file = sorted(glob.glob(str(new / "*" / f"{cases[0]}.nii.gz")))[0]
    predict.main(predict.get_args(["--run", backbone, "--input", file, "--out", str(one), "--device", "cpu"]))
    assert sorted(os.listdir(one)) == [f"{cases[0]}.nii.gz", "predict.json"]
    assert_same_nifti(one / f"{cases[0]}.nii.gz", os.path.join(saved["ref"], f"{cases[0]}.nii.gz"))


def test_bad_cases_fail_alone(tmp_path, capsys, predict, acdc, backbone, saved):
    """In nnU-Net's naming: one good case and five bad ones. Each bad one gets one line naming it and no file (an
    earlier run's file of it is removed, and its line says so), the good one is written, the exit code is 1 with a
    summary line."""
    case = split_cases(acdc)[0]
    src = glob.glob(os.path.join(acdc[0], "*", "*", f"{case}.nii.gz"))[0]
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(src, inp / "good_0000.nii.gz")
    shutil.copyfile(src, inp / "two_0000.nii.gz")                       # a second modality the run never saw
    shutil.copyfile(src, inp / "two_0001.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), inp / "fourd_0000.nii.gz")
    nan = data.copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), inp / "nan_0000.nii.gz")
    with open(src, "rb") as f:
        raw = gzip.decompress(f.read())
    with open(inp / "cut_0000.nii.gz", "wb") as f:                      # a download cut short
        f.write(gzip.compress(raw[:len(raw) // 2]))
    (inp / "junk_0000.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(src, out / "nan.nii.gz")                            # an earlier run's prediction of a bad case
    with pytest.raises(SystemExit) as stop:
        predict.cli(predict.main, predict.get_args, ["--run", backbone, "--input", str(inp), "--out", str(out),
                                                     "--device", "cpu"])
    assert stop.value.code == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    bad = ("two", "fourd", "nan", "cut", "junk")
    for name, says in zip(bad, ("trained on 1 modalities", "3-D volume", "NaN", "cannot read", "cannot read")):
        assert sum(f"case {name}:" in ln for ln in errors) == 1 and says in next(ln for ln in errors
                                                                                if f"case {name}:" in ln), name
    assert "5 of 6 case(s) failed" in errors[-1]
    assert sorted(os.listdir(out)) == ["good.nii.gz", "predict.json"]    # nothing half-written, no temporary, no stale
    assert_same_nifti(out / "good.nii.gz", os.path.join(saved["ref"], f"{case}.nii.gz"))
    failed = json.load(open(out / "predict.json"))["failed"]
    assert set(failed) == set(bad)
    assert f"removed {out / 'nan.nii.gz'}" in failed["nan"]
    assert "removed" in next(ln for ln in errors if "case nan:" in ln)
    assert not any("removed" in failed[name] for name in bad if name != "nan")
    with pytest.raises(InputError, match="no such file or folder"):
        predict.main(predict.get_args(["--run", backbone, "--input", str(tmp_path / "nothing"), "--out", str(out)]))


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory, scripts):
    """(raw dir, run) of a base U-Net trained one epoch on a 3-patient nnU-Net phantom with two channels (the other
    runs here have one): the smallest run for which channels can be off each other's grid."""
    base = tmp_path_factory.mktemp("two")
    write_phantom(str(base / "raw"), "nnunet", 3, seed=0, size=24)
    pre, pt = scripts["01_preprocess"], scripts["02_pretrain"]
    pre.main(pre.get_args(["--dataset", "nnunet", "--raw", str(base / "raw"), "--out", str(base / "data"),
                           "--crop", "32", "32", "--processes", "0"]))
    pt.main(pt.get_args(["--data", str(base / "data" / "slices.h5"), "--splits", str(base / "data" / "splits.json"),
                         "--width", "8", "--epochs", "1", "--batch_size", "16", "--out", str(base / "ref")]))
    return str(base / "raw"), str(base / "ref")


def test_channels_off_the_grid_fail_alone(tmp_path, capsys, predict, two_channel_run):
    """Two channels, one good case and two whose second channel is mirrored or shifted: each bad one gets one line
    naming both files and what differs, and no file (an earlier run's is removed); the good one is written; exit 1."""
    raw, run = two_channel_run
    src = [os.path.join(raw, "imagesTr", f"PHANTOM_000_{c:04d}.nii.gz") for c in range(2)]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    img = nib.load(src[1])
    moved = {"flip": img.affine @ np.diag([-1.0, 1, 1, 1]),                        # the x axis the other way
             "shift": img.affine + np.pad([[0], [0], [4.0]], ((0, 1), (3, 0)))}      # the origin 4 mm up
    for name in ("good", *moved):
        shutil.copyfile(src[0], inp / f"{name}_0000.nii.gz")
        if name in moved:
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved[name]), inp / f"{name}_0001.nii.gz")
        else:
            shutil.copyfile(src[1], inp / f"{name}_0001.nii.gz")
    shutil.copyfile(src[0], out / "flip.nii.gz")                         # an earlier run's prediction
    with pytest.raises(SystemExit) as stop:
        predict.cli(predict.main, predict.get_args, ["--run", run, "--input", str(inp), "--out", str(out),
                                                     "--device", "cpu"])
    assert stop.value.code == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    for name, says in (("flip", "direction differs (mirrored x axis)"), ("shift", "origin differs by 4.0 mm")):
        line = next(ln for ln in errors if f"case {name}:" in ln)
        assert f"{inp / name}_0001.nii.gz" in line and f"{inp / name}_0000.nii.gz" in line and says in line, line
    assert "removed" in next(ln for ln in errors if "case flip:" in ln) and "2 of 3 case(s) failed" in errors[-1]
    assert sorted(os.listdir(out)) == ["good.nii.gz", "predict.json"]
    assert set(json.load(open(out / "predict.json"))["failed"]) == {"flip", "shift"}


def test_data_not_found_says_give_data(tmp_path, predict, acdc, backbone):
    """A run whose slices.h5 has moved: one line that says to give --data; --data then works."""
    run = tmp_path / "run"
    shutil.copytree(backbone, run)
    rec = json.load(open(run / "args.json"))
    rec["args"]["data"] = str(tmp_path / "moved" / "slices.h5")
    json.dump(rec, open(run / "args.json", "w"))
    case = split_cases(acdc)[0]
    src = glob.glob(os.path.join(acdc[0], "*", "*", f"{case}.nii.gz"))[0]
    with pytest.raises(InputError, match="give --data"):
        predict.main(predict.get_args(["--run", str(run), "--input", src, "--out", str(tmp_path / "o")]))
    predict.main(predict.get_args(["--run", str(run), "--input", src, "--out", str(tmp_path / "o"),
                                   "--data", data_args(acdc)[1]]))
    assert os.path.isfile(tmp_path / "o" / f"{case}.nii.gz")


GRID = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 10], [0, 0, 2.0, -5], [0, 0, 0, 1]])        # LPS, 1 x 1 x 2 mm
OFF_GRID = {   # how a second channel's grid differs from the first's -> what the error says
    "mirrored": (lambda a, s: (a @ np.diag([-1.0, 1, 1, 1]), s), "direction differs (mirrored x axis)"),
    "rotated": (lambda a, s: (a @ np.array([[0, -1.0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), s),
                "direction differs (rotated by 90°)"),
    "shifted": (lambda a, s: (a + np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 4.0], [0] * 4]), s),
                "origin differs by 4.0 mm"),
    "spacing": (lambda a, s: (a @ np.diag([1, 1, 2.5, 1]), s), "spacing (1.0, 1.0, 5.0) vs (1.0, 1.0, 2.0)"),
    "shape": (lambda a, s: (a, (8, 8, 5)), "shape (8, 8, 5) vs (8, 8, 4)"),
}


def _volume(path, affine, shape=(8, 8, 4)):
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), str(path))
    return str(path)


@pytest.mark.parametrize("kind", sorted(OFF_GRID))
def test_channels_off_the_first_grid_are_refused(tmp_path, kind):
    """A second channel (or a label) whose shape, spacing, origin or direction differs from the first channel's is
    refused in one line naming the case, both files, what differs and what to do; header rounding is not refused."""
    change, says = OFF_GRID[kind]
    first = _volume(tmp_path / "x_0000.nii.gz", GRID)
    second = _volume(tmp_path / "x_0001.nii.gz", *change(GRID, (8, 8, 4)))
    with pytest.raises(DataError) as err:
        load_images(Case("x", "x", [first, second], None, "mri"))
    msg = str(err.value)
    assert msg.startswith(f"case x: {second} ") and first in msg and says in msg and "resample" in msg, msg
    assert "\n" not in msg
    label = _volume(tmp_path / "x_label.nii.gz", *change(GRID, (8, 8, 4)))
    info = DatasetInfo("nnunet", ["MRI"], ["fg"], {0: 0, 1: 1})
    with pytest.raises(DataError, match=f"case x: {re.escape(label)} .*{re.escape(first)}.*{re.escape(says)}"):
        load_case(Case("x", "x", [first], label, "mri"), info)
    rounded = _volume(tmp_path / "x_rounded.nii.gz", GRID + np.vstack([np.full((3, 4), 2e-5), np.zeros(4)]))
    assert load_images(Case("x", "x", [first, rounded], None, "mri"))[0].shape == (8, 8, 4, 2)
    load_case(Case("x", "x", [first], rounded, "mri"), info)


@pytest.mark.parametrize("spacing", [None, ["1.0", "1.0"]])
def test_new_case_gets_the_training_preprocessing(tmp_path, scripts, predict, spacing):
    """CT (clip and z-score with the training statistics), with and without --spacing, some slices cropped and some
    padded: predict.py's preprocessing of each raw image equals its slices in slices.h5 bit for bit, its geometry
    the one recorded, and the way back puts the recorded labels into the original label file's grid."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    write_phantom(raw, "kits", 4, seed=2, size=36)
    m = scripts["01_preprocess"]
    m.main(m.get_args(["--dataset", "kits", "--raw", raw, "--out", out, "--crop", "32", "32", "--processes", "0",
                       *(["--spacing", *spacing] if spacing else [])]))
    meta = read_meta(os.path.join(out, "slices.h5"))
    assert meta["normalisation"]["ct"] is not None
    with h5py.File(os.path.join(out, "slices.h5")) as f:
        for i, case_id in enumerate(meta["cases"]["case_id"]):
            image = json.loads(meta["cases"]["source"][i])[0]
            r = predict.preprocess(Case(case_id, case_id, [image], None, "ct"), meta)
            a, n = int(meta["cases"]["first_slice"][i]), int(meta["cases"]["n_slices"][i])
            np.testing.assert_array_equal(r["images"], f["images"][a:a + n])
            for k, v in case_geometry(meta, case_id).items():
                np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(v), err_msg=f"{case_id} {k}")
            back = slices_to_nifti(f["labels"][a:a + n], meta, case_id, geometry=r)
            label = nib.load(json.loads(meta["cases"]["source"][i])[-1])
            assert back.shape == label.shape
            np.testing.assert_allclose(back.affine, label.affine)
            b, lab = np.asarray(back.dataobj), np.asarray(label.dataobj)
            if spacing is None:                      # inside the crop the label itself, outside background
                assert np.all((b == lab) | (b == 0)) and (b > 0).sum() == (f["labels"][a:a + n] > 0).sum() > 0, case_id
            else:                                    # resampled there and back (nearest): nearly the label
                assert 2 * ((b == lab) & (lab > 0)).sum() >= 0.8 * ((b > 0).sum() + (lab > 0).sum()), case_id


def _files(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), os.path.join(folder, name))


def test_plain_file_names_with_one_modality(tmp_path):
    """One modality: liver_0012.nii.gz and liver_0013.nii.gz (no liver_0000) are two cases, not channels 12 and 13
    of "liver", also in different folders; CASE_0000.nii.gz is the case CASE (a CASE_0001 beside it would be an
    extra channel: a bad case); two modalities keep nnU-Net's channel naming."""
    _files(tmp_path, "liver_0012.nii.gz", "liver_0013.nii.gz", "scan_0000.nii.gz")
    got, skipped = image_cases(str(tmp_path), "nnunet", ["MRI"])
    got = dict(got)
    assert sorted(got) == ["liver_0012", "liver_0013", "scan"] and list(got["scan"]) == [0] and skipped == {}
    two = dict(image_cases(str(tmp_path), "nnunet", ["T1", "T2"])[0])
    assert sorted(two) == ["liver", "scan"] and sorted(two["liver"]) == [12, 13]
    _files(tmp_path / "apart" / "A", "liver_0012.nii.gz")
    _files(tmp_path / "apart" / "B", "liver_0013.nii.gz")
    got, _ = image_cases(str(tmp_path / "apart"), "nnunet", ["MRI"])
    assert [(c, ch[0]) for c, ch in got] == [("liver_0012", [str(tmp_path / "apart" / "A" / "liver_0012.nii.gz")]),
                                             ("liver_0013", [str(tmp_path / "apart" / "B" / "liver_0013.nii.gz")])]


@pytest.mark.parametrize("names, case", [
    (["x_0001.nii.gz", "x_0001_0000.nii.gz"], "x_0001"),          # plain x_0001 (no x_0000) and x_0001's channel 0
    (["A/x.nii.gz", "B/x.nii.gz"], "x"),                          # plain names, nothing else named
    (["A/scan_0000.nii.gz", "B/scan_0000.nii.gz"], "scan"),       # one case id in two folders
    (["A/patient001_frame01.nii.gz", "B/patient001_frame01.nii.gz"], "patient001_frame01"),
])
def test_two_files_one_case_id_are_refused(tmp_path, names, case):
    """Two different files that give one case id (which would both be written to OUT/CASE.nii.gz) are refused
    naming both, never one kept in silence; also when --input is one of them."""
    for name in names:
        _files(tmp_path / os.path.dirname(name), os.path.basename(name))
    paths = [str(tmp_path / n) for n in names]
    dataset = "acdc" if "patient" in names[0] else "nnunet"
    with pytest.raises(InputError, match=f"case id {case} .*{re.escape(paths[0])} and .*{re.escape(paths[1])}"):
        image_cases(str(tmp_path), dataset, ["MRI"])
    for path in paths:                                            # one file asked for: that file alone
        cases, _ = image_cases(path, dataset, ["MRI"])
        assert [(c, ch) for c, ch in cases] == [(case, {0: [path]})]


def test_files_that_are_no_case_are_listed(tmp_path):
    """Every NIfTI file under --input is a case or a skip with its reason: an ACDC patient folder's _gt labels and
    4-D series, an AMOS labelsTr/ folder, BraTS's _seg, KiTS's segmentation, names of no layout; a folder of plain
    names (one modality) leaves the label files out too; nothing but skips is an error that lists them."""
    acdc = tmp_path / "acdc" / "patient001"
    _files(acdc, "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz", "patient001_4d.nii.gz", "notes.nii.gz")
    cases, skipped = image_cases(str(tmp_path / "acdc"), "acdc", ["cine-MRI"])
    assert [c for c, _ in cases] == ["patient001_frame01"]
    assert skipped == {str(acdc / "patient001_frame01_gt.nii.gz"): "a label file (_gt)",
                       str(acdc / "patient001_4d.nii.gz"): "a 4-D series (_4d)",
                       str(acdc / "notes.nii.gz"): "not named as an image of the acdc layout or as CASE_0000.nii.gz"}
    _files(tmp_path / "amos" / "imagesTs", "amos_0001.nii.gz")
    _files(tmp_path / "amos" / "labelsTs", "amos_0001.nii.gz")
    cases, skipped = image_cases(str(tmp_path / "amos"), "amos", ["CT"])
    assert [c for c, _ in cases] == ["amos_0001"]
    assert skipped == {str(tmp_path / "amos" / "labelsTs" / "amos_0001.nii.gz"): "a label file (in labelsTs/)"}
    _files(tmp_path / "brats" / "B_00001", *(f"B_00001_{m}.nii.gz" for m in ("t1", "t2", "seg")))
    _files(tmp_path / "kits" / "case_00001", "imaging.nii.gz", "segmentation.nii.gz")
    for dataset, mods, label in (("brats", ["t1", "t2"], "B_00001/B_00001_seg.nii.gz"),
                                 ("kits", ["CT"], "case_00001/segmentation.nii.gz")):
        cases, skipped = image_cases(str(tmp_path / dataset), dataset, mods)
        assert len(cases) == 1 and list(skipped) == [str(tmp_path / dataset / label)], dataset
        assert skipped[str(tmp_path / dataset / label)].startswith("a label file")
    _files(tmp_path / "plain", "liver.nii.gz", "brain.nii", "liver_seg.nii.gz")
    cases, skipped = image_cases(str(tmp_path / "plain"), "nnunet", ["CT"])
    assert [c for c, _ in cases] == ["brain", "liver"]
    assert list(skipped) == [str(tmp_path / "plain" / "liver_seg.nii.gz")]
    _files(tmp_path / "labels_only", "patient001_frame01_gt.nii.gz")
    with pytest.raises(InputError, match=r"no images found.*1 NIfTI file\(s\) skipped.*patient001_frame01_gt"):
        image_cases(str(tmp_path / "labels_only"), "acdc", ["cine-MRI"])
