"""predict.py: new images -> label maps in their own geometry, exactly what 05 --save_nifti writes; the training
preprocessing repeated bit for bit (CT, --spacing); bad input fails the case, not the run."""
import glob
import gzip
import json
import os
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from common.data import case_geometry, read_meta, slices_to_nifti
from common.iac import write_genotype
from common.phantom import write_phantom
from common.raw import Case, DataError, load_images
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


def test_predict_equals_what_05_saves(tmp_path, predict, acdc, backbone, iac_run, saved):
    """The test patients' raw folders (images beside their _gt labels and 4-D cine files) through predict.py give,
    for a stage I and a stage III run, exactly 05's --save_nifti files; a single file gives its one case."""
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
    one = tmp_path / "one"
    file = sorted(glob.glob(str(new / "*" / f"{cases[0]}.nii.gz")))[0]
    predict.main(predict.get_args(["--run", backbone, "--input", file, "--out", str(one), "--device", "cpu"]))
    assert sorted(os.listdir(one)) == [f"{cases[0]}.nii.gz", "predict.json"]
    assert_same_nifti(one / f"{cases[0]}.nii.gz", os.path.join(saved["ref"], f"{cases[0]}.nii.gz"))


def test_bad_cases_fail_alone(tmp_path, capsys, predict, acdc, backbone, saved):
    """In nnU-Net's naming: one good case and five bad ones. Each bad one gets one line naming it and no file, the
    good one is written, the exit code is 1 with a summary line."""
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
    assert sorted(os.listdir(out)) == ["good.nii.gz", "predict.json"]    # nothing half-written, no temporary
    assert_same_nifti(out / "good.nii.gz", os.path.join(saved["ref"], f"{case}.nii.gz"))
    assert set(json.load(open(out / "predict.json"))["failed"]) == set(bad)
    with pytest.raises(InputError, match="no such file or folder"):
        predict.main(predict.get_args(["--run", backbone, "--input", str(tmp_path / "nothing"), "--out", str(out)]))


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


def test_modalities_of_different_shapes_name_the_case(tmp_path):
    a, b = str(tmp_path / "x_0000.nii.gz"), str(tmp_path / "x_0001.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), a)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 5), np.float32), np.eye(4)), b)
    with pytest.raises(DataError, match="case x: .*x_0001.nii.gz has shape"):
        load_images(Case("x", "x", [a, b], None, "mri"))


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


def test_plain_file_names_with_one_modality(tmp_path):
    """One modality: liver_0012.nii.gz and liver_0013.nii.gz (no liver_0000) are two cases, not channels 12 and 13
    of "liver"; CASE_0000.nii.gz is the case CASE (a CASE_0001 beside it would be an extra channel: a bad case);
    two modalities keep nnU-Net's channel naming."""
    from common.raw import image_cases
    for name in ("liver_0012", "liver_0013", "scan_0000"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    got = dict(image_cases(str(tmp_path), "nnunet", ["MRI"]))
    assert sorted(got) == ["liver_0012", "liver_0013", "scan"] and list(got["scan"]) == [0]
    two = dict(image_cases(str(tmp_path), "nnunet", ["T1", "T2"]))
    assert sorted(two) == ["liver", "scan"] and sorted(two["liver"]) == [12, 13]
