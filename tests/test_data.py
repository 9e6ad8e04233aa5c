"""Preprocessing (01): every raw layout -> slices.h5, normalisation, splits, orientation, round trip, bad input."""
import glob
import json
import os
import shutil
from collections import Counter

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import SliceDataset, original_label, read_meta, slices_to_nifti, zscore_nonzero
from common.phantom import write_phantom
from common.raw import DataError
from common.utils import InputError
from conftest import load_script

LAYOUT_TO_DATASET = {"acdc": "acdc", "brats2021": "brats", "brats2023": "brats", "kits": "kits", "amos": "amos",
                     "nnunet": "nnunet"}
EXPECTED = {"acdc": (1, 3), "brats2021": (4, 3), "brats2023": (4, 3), "kits": (1, 3), "amos": (1, 15), "nnunet": (2, 2)}


def preprocess(scripts, dataset, raw, out, *extra):
    m = scripts["01_preprocess"]
    m.main(m.get_args(["--dataset", dataset, "--raw", raw, "--out", out, "--crop", "64", "64", "--processes", "1",
                       *extra]))
    return os.path.join(out, "slices.h5"), os.path.join(out, "splits.json")


@pytest.mark.parametrize("layout", sorted(LAYOUT_TO_DATASET))
def test_every_layout(tmp_path, scripts, layout):
    raw = str(tmp_path / "raw")
    write_phantom(raw, layout, 5, seed=3, size=40)
    h5, sp = preprocess(scripts, LAYOUT_TO_DATASET[layout], raw, str(tmp_path / "out"))
    meta = read_meta(h5)
    n_ch, n_cls = EXPECTED[layout]
    assert meta["shape"][1:] == (n_ch, 64, 64)
    assert len(meta["class_names"]) == n_cls
    with h5py.File(h5) as f:
        assert f["images"].dtype == np.float32 and f["labels"].dtype == np.uint8
        assert f["images"].chunks == (1, n_ch, 64, 64)
        labels = f["labels"][:]
        assert labels.max() <= n_cls and np.isfinite(f["images"][:]).all()
    splits = json.load(open(sp))
    parts = [set(splits["patients"][k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set(splits["patients"]["train_search"]) | set(splits["patients"]["val_search"]) <= parts[0]
    if layout == "brats2021":       # label 4 (ET) is remapped to 3
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and meta["label_values"] == [0, 1, 2, 4]
    assert json.load(open(os.path.join(tmp_path, "out", "crop_report.json")))["foreground_lost_fraction"] == 0
    # the crop holds each whole slice here, so the way back is exact: NIfTI out = the original label file
    # with its own values, and original_label() = that file in our indices
    for case in meta["cases"]["case_id"][:2]:
        i = meta["case_index"][case]
        a, n = int(meta["cases"]["first_slice"][i]), int(meta["cases"]["n_slices"][i])
        src = nib.load(json.loads(meta["cases"]["source"][i])[-1])
        out = slices_to_nifti(labels[a:a + n], meta, case)
        assert np.array_equal(np.asarray(out.dataobj), np.asarray(src.dataobj)), case
        index, spacing = original_label(meta, case)
        assert np.array_equal(np.asarray(meta["label_values"])[index], np.asarray(src.dataobj))
        assert np.allclose(spacing, nib.affines.voxel_sizes(src.affine))


def test_acdc_frames_stay_together(acdc):
    splits = json.load(open(os.path.join(acdc[1], "splits.json")))
    for k in ("train", "val", "test"):
        pids = {c.split("_frame")[0] for c in splits[k]}
        assert pids == set(splits["patients"][k])
        assert len(splits[k]) == 2 * len(pids)       # ED and ES frame of each patient


def test_mri_normalisation():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 5), np.float32)
    x[5:15, 5:15] = rng.normal(300, 40, size=(10, 10, 5))
    z = zscore_nonzero(x)
    v = z[x != 0]
    assert abs(v.mean()) < 1e-5 and abs(v.std() - 1) < 1e-4 and np.all(z[x == 0] == 0)


def test_stored_mri_is_standardised(acdc):
    with h5py.File(os.path.join(acdc[1], "slices.h5")) as f:
        img = f["images"][:]
    v = img[img != 0]
    assert abs(v.mean()) < 0.3 and 0.7 < v.std() < 1.3


def test_mri_padding_continues_the_zero_background(tmp_path):
    """A slice smaller than the crop is padded with the background (0 after zscore_nonzero), not the minimum of
    the standardised image, which drew a frame around padded MRI slices."""
    from common.data import process_case
    from common.raw import list_cases
    raw = str(tmp_path / "raw")
    write_phantom(raw, "acdc", 3, seed=0, size=32)
    info = list_cases("acdc", raw)
    case = info.cases[0]
    out = process_case(case, info, [96, 96], None, None)["images"]          # (Z, C, 96, 96) from ~32x32 slices
    assert out.min() < 0                                                      # the old fill would be negative
    border = np.concatenate([out[..., :4, :].ravel(), out[..., -4:, :].ravel(), out[..., :, :4].ravel()])
    assert np.all(border == 0)


def _write(arr, affine, path):
    nib.save(nib.Nifti1Image(arr, affine), path)


def test_kits_slice_axis_first_equals_axial_last(tmp_path, scripts):
    """The same volume stored (I, P, L) — slice axis first — and (R, A, S) gives the same slices."""
    raw = str(tmp_path / "raw")
    write_phantom(raw, "kits", 4, seed=5, size=40)
    ras = str(tmp_path / "raw_ras")
    shutil.copytree(raw, ras)
    for f in glob.glob(os.path.join(ras, "case_*", "*.nii.gz")):
        img = nib.load(f)
        can = nib.as_closest_canonical(img)
        assert img.shape[0] == can.shape[2]               # stored slice axis first
        _write(np.asarray(can.dataobj), can.affine, f)
    a, _ = preprocess(scripts, "kits", raw, str(tmp_path / "a"))
    b, _ = preprocess(scripts, "kits", ras, str(tmp_path / "b"))
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["labels"][:], fb["labels"][:])
        np.testing.assert_allclose(fa["images"][:], fb["images"][:], atol=1e-5)


@pytest.mark.parametrize("spacing", [None, ["1.0", "1.0"]])
def test_round_trip_to_original_geometry(tmp_path, scripts, spacing):
    """Ground-truth slices written back as NIfTI equal the original label file voxel for voxel."""
    raw = str(tmp_path / "raw")
    write_phantom(raw, "amos", 4, seed=7, size=40)
    extra = ["--spacing", *spacing] if spacing else []
    m = scripts["01_preprocess"]
    out = str(tmp_path / "out")
    m.main(m.get_args(["--dataset", "amos", "--raw", raw, "--out", out, "--crop", "96", "96", "--processes", "1",
                       "--modality", "all", *extra]))
    h5 = os.path.join(out, "slices.h5")
    meta = read_meta(h5)
    with h5py.File(h5) as f:
        for i, case in enumerate(meta["cases"]["case_id"]):
            a, n = int(meta["cases"]["first_slice"][i]), int(meta["cases"]["n_slices"][i])
            img = slices_to_nifti(f["labels"][a:a + n], meta, case)
            src = json.loads(f["cases"]["source"][i])[-1]
            orig = nib.load(src)
            assert img.shape == orig.shape
            np.testing.assert_allclose(img.affine, orig.affine)
            if spacing is None:
                np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(orig.dataobj))
            else:   # nearest resampling there and back: almost every voxel agrees
                agree = (np.asarray(img.dataobj) == np.asarray(orig.dataobj)).mean()
                assert agree > 0.97


def test_dataset_cache_and_workers(acdc):
    h5 = os.path.join(acdc[1], "slices.h5")
    splits = json.load(open(os.path.join(acdc[1], "splits.json")))
    cached = SliceDataset(h5, splits["train"], cache=True)
    lazy = SliceDataset(h5, splits["train"], cache=False)
    assert len(cached) == len(lazy) > 0
    idx = [5, 0, 3, 3, len(lazy) - 1]
    (x1, y1), (x2, y2) = cached.__getitems__(idx), lazy.__getitems__(idx)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.dtype == torch.uint8
    assert torch.equal(x1[1], cached[0][0]) and torch.equal(x2[2], x2[3])     # order kept, repeats served
    from common.engine import make_loader
    xs = torch.cat([x for x, _ in make_loader(lazy, 8, False, workers=2)])
    assert torch.equal(xs, torch.stack([cached[i][0] for i in range(len(cached))]))


# --------------------------------------------------------------------------- bad input
def _acdc_raw(tmp_path):
    raw = str(tmp_path / "raw")
    write_phantom(raw, "acdc", 4, seed=2, size=32)
    return raw


def _gt(raw, pid="patient002"):
    return sorted(glob.glob(os.path.join(raw, "*", pid, f"{pid}_frame*_gt.nii.gz")))[0]


def _mutate(path, fn, dtype=None):
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(dtype or img.get_data_dtype())
    data, affine = fn(data, img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


BAD = {
    "shape mismatch": lambda raw: _mutate(_gt(raw), lambda d, a: (d[:-1], a)),
    "affine mismatch": lambda raw: _mutate(_gt(raw), lambda d, a: (d, a + np.diag([0.5, 0, 0, 0]))),
    "nan voxels": lambda raw: _mutate(_gt(raw).replace("_gt", ""), lambda d, a: (np.where(d > d.mean(), np.nan, d), a),
                                      np.float32),
    "non-integer labels": lambda raw: _mutate(_gt(raw), lambda d, a: (d + 0.5, a), np.float32),
    "unknown label": lambda raw: _mutate(_gt(raw), lambda d, a: (np.where(d == 3, 7, d), a)),
    "4-d volume": lambda raw: _mutate(_gt(raw).replace("_gt", ""), lambda d, a: (np.stack([d, d], -1), a)),
    "truncated file": lambda raw: open(_gt(raw), "r+b").truncate(200),
    "duplicate patient": lambda raw: shutil.copytree(os.path.dirname(_gt(raw, "patient001")),
                                                     os.path.join(raw, "extra", "patient001")),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_names_the_case(tmp_path, scripts, kind):
    raw = _acdc_raw(tmp_path)
    BAD[kind](raw)
    out = str(tmp_path / "out")
    with pytest.raises(DataError) as err:
        preprocess(scripts, "acdc", raw, out)
    assert "patient00" in str(err.value)
    assert not glob.glob(os.path.join(out, "slices.h5*")) and not os.path.exists(os.path.join(out, "splits.json"))


def test_missing_modality_and_empty_folder(tmp_path, scripts):
    raw = str(tmp_path / "brats")
    write_phantom(raw, "brats2021", 3, seed=1, size=32)
    os.remove(glob.glob(os.path.join(raw, "BraTS2021_00001", "*_t2.nii.gz"))[0])
    with pytest.raises(DataError, match="BraTS2021_00001.*missing file"):
        preprocess(scripts, "brats", raw, str(tmp_path / "o1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no kits cases"):
        preprocess(scripts, "kits", str(empty), str(tmp_path / "o2"))


@pytest.mark.parametrize("processes", ["0", "2"])
def test_channel_off_the_first_grid_stops_01(tmp_path, scripts, processes):
    """A BraTS case whose t2 header is mirrored (read as aligned, its slices would be the wrong way round beside the
    other channels): 01 stops naming the case, both files and what differs, and writes no slices (nor a temporary);
    in this process or in worker processes alike."""
    raw = str(tmp_path / "brats")
    write_phantom(raw, "brats2021", 3, seed=1, size=32)
    t1, t2 = (os.path.join(raw, "BraTS2021_00001", f"BraTS2021_00001_{m}.nii.gz") for m in ("t1", "t2"))
    _mutate(t2, lambda d, a: (d, a @ np.diag([-1.0, 1, 1, 1])))
    out = str(tmp_path / "out")
    with pytest.raises(DataError) as err:
        preprocess(scripts, "brats", raw, out, "--processes", processes)
    msg = str(err.value)
    assert msg.startswith(f"case BraTS2021_00001: {t2} ") and t1 in msg and "mirrored x axis" in msg, msg
    assert "resample" in msg and "\n" not in msg
    assert not glob.glob(os.path.join(out, "slices.h5*")) and not os.path.exists(os.path.join(out, "splits.json"))


def test_all_background_volume_is_valid(tmp_path, scripts):
    raw = _acdc_raw(tmp_path)
    _mutate(_gt(raw), lambda d, a: (np.zeros_like(d), a))
    h5, _ = preprocess(scripts, "acdc", raw, str(tmp_path / "out"))
    assert os.path.isfile(h5)


def test_cli_error_exit_code(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "01_preprocess.py"), "--dataset", "acdc", "--raw",
                        str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_crop_report_counts_what_the_crop_drops(tmp_path, scripts, capsys):
    raw = str(tmp_path / "raw")
    write_phantom(raw, "kits", 3, seed=4, size=64)
    m = scripts["01_preprocess"]
    m.main(m.get_args(["--dataset", "kits", "--raw", raw, "--out", str(tmp_path / "o"), "--crop", "32", "32",
                       "--processes", "1"]))
    report = json.load(open(tmp_path / "o" / "crop_report.json"))
    per_case = report["per_case"]
    assert 0 < report["foreground_lost_fraction"] < 1 and len(per_case) == 3
    lost = sum(c["lost"] for c in per_case.values()) / sum(c["foreground_voxels"] for c in per_case.values())
    assert lost == pytest.approx(report["foreground_lost_fraction"])
    assert "warning: case" in capsys.readouterr().out


# --------------------------------------------------------------------------- splits you can give
def test_split_file_official_split_and_nnunet_converter(tmp_path, scripts, acdc, monkeypatch):
    raw, m = acdc[0], scripts["01_preprocess"]
    pids = sorted({os.path.basename(d) for d in glob.glob(os.path.join(raw, "*", "patient*"))})
    given = {"train": pids[:4], "val": pids[4:6], "test": pids[6:]}
    sf = tmp_path / "split.json"
    json.dump(given, open(sf, "w"))
    out = str(tmp_path / "given")
    m.main(m.get_args(["--dataset", "acdc", "--raw", raw, "--out", out, "--crop", "64", "64",
                       "--split_file", str(sf)]))
    splits = json.load(open(os.path.join(out, "splits.json")))
    assert {k: splits["patients"][k] for k in given} == given
    assert set(splits["patients"]["train_search"]) | set(splits["patients"]["val_search"]) == set(given["train"])
    for bad, msg in (({**given, "val": given["val"] + pids[:1]}, "more than once"),
                     ({**given, "test": given["test"] + ["patient999"]}, "not found in --raw.*patient999"),
                     ({**given, "test": given["test"][:-1]}, "leaves out patients")):
        json.dump(bad, open(sf, "w"))
        with pytest.raises(InputError, match=msg):
            m.main(m.get_args(["--dataset", "acdc", "--raw", raw, "--out", str(tmp_path / "x"), "--crop", "64", "64",
                               "--split_file", str(sf)]))
    off = str(tmp_path / "official")
    m.main(m.get_args(["--dataset", "acdc", "--raw", raw, "--out", off, "--crop", "64", "64", "--split", "official"]))
    testing = sorted(os.path.basename(d) for d in glob.glob(os.path.join(raw, "testing", "patient*")))
    assert testing and json.load(open(os.path.join(off, "splits.json")))["patients"]["test"] == testing

    conv = load_script("scripts/convert_to_nnunet")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    nn = str(tmp_path / "Dataset501_ACDC")
    conv.main(conv.get_args(["--dataset", "acdc", "--raw", raw, "--out", nn, "--splits",
                             os.path.join(out, "splits.json")]))
    names = {d: sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(nn, d)))
             for d in ("labelsTr", "labelsTs")}
    assert names["labelsTs"] == sorted(splits["test"]) and names["labelsTr"] == sorted(splits["train"] + splits["val"])
    folds = json.load(open(os.path.join(tmp_path, "pre", "Dataset501_ACDC", "splits_final.json")))
    assert folds == [{"train": sorted(splits["train"]), "val": sorted(splits["val"])}]
    assert json.load(open(os.path.join(nn, "dataset.json")))["numTraining"] == len(names["labelsTr"])
    assert len(os.listdir(os.path.join(nn, "imagesTs"))) == len(splits["test"])

    # without --splits: nnU-Net's five folds drawn over patients, the ED and ES frames of a patient on one side
    nn5 = str(tmp_path / "Dataset502_ACDC")
    conv.main(conv.get_args(["--dataset", "acdc", "--raw", raw, "--out", nn5]))
    patient = json.load(open(os.path.join(nn5, "dataset.json")))["patients"]
    folds = json.load(open(os.path.join(tmp_path, "pre", "Dataset502_ACDC", "splits_final.json")))
    assert folds == json.load(open(os.path.join(nn5, "splits_final.json"))) and len(folds) == 5
    assert max(Counter(patient.values()).values()) == 2                          # the phantom has two frames
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(patient)                                       # every case validated once
    for f in folds:
        assert sorted(f["train"] + f["val"]) == sorted(patient)
        assert not {patient[c] for c in f["train"]} & {patient[c] for c in f["val"]}
    assert conv.patient_folds({"a": "a", "b": "b"}) is None                      # one case each: nnU-Net's own
    assert conv.patient_folds({"a_1": "a", "a_2": "a"}) is None                  # one patient: no folds
    assert len(conv.patient_folds({"a_1": "a", "a_2": "a", "b_1": "b"})) == 2    # fewer patients than folds


# --------------------------------------------------------------------------- several scans of one subject
def _sessions_raw(tmp_path, patients=None):
    """An nnU-Net-layout phantom of 9 scans renamed sub-0S_ses-T: subjects 1-4 with two sessions, 5 with one;
    `patients` is written into dataset.json when given."""
    raw = str(tmp_path / "raw")
    write_phantom(raw, "nnunet", 9, seed=2, size=32)
    for k in range(9):
        new = f"sub-{k // 2 + 1:02d}_ses-{k % 2 + 1}"
        for f in glob.glob(os.path.join(raw, "*", f"PHANTOM_{k:03d}*")):
            os.rename(f, f.replace(f"PHANTOM_{k:03d}", new))
    if patients is not None:
        meta = json.load(open(os.path.join(raw, "dataset.json")))
        json.dump({**meta, "patients": patients}, open(os.path.join(raw, "dataset.json"), "w"))
    return raw


def _assert_subjects_apart(splits):
    """No subject in two of train / val / test, nor in both search halves; every case on its subject's side."""
    subject = {c: c.split("_")[0] for c in splits["patient_of"]}
    assert splits["patient_of"] == subject
    for a, b in (("train", "val"), ("train", "test"), ("val", "test"), ("train_search", "val_search")):
        assert not {subject[c] for c in splits[a]} & {subject[c] for c in splits[b]}, (a, b)
        assert not set(splits["patients"][a]) & set(splits["patients"][b]), (a, b)
    assert sorted(splits["train_search"] + splits["val_search"]) == sorted(splits["train"])


def test_subjects_keep_a_subjects_scans_on_one_side(tmp_path, scripts, capsys):
    """--subjects REGEX and dataset.json's "patients" put both sessions of a subject on one side of every split;
    without either, the ids draw a warning."""
    raw = _sessions_raw(tmp_path)
    preprocess(scripts, "nnunet", raw, str(tmp_path / "none"))
    said = capsys.readouterr().out
    assert "warning: case ids look like repeated scans" in said and "sub-01_ses-1, sub-01_ses-2 -> sub-01" in said
    assert "4 such subject(s)" in said and "--subjects" in said
    _, sp = preprocess(scripts, "nnunet", raw, str(tmp_path / "regex"), "--subjects", r"^(sub-\d+)_")
    assert "repeated scans" not in capsys.readouterr().out
    splits = json.load(open(sp))
    _assert_subjects_apart(splits)
    assert sorted(p for k in ("train", "val", "test") for p in splits["patients"][k]) == [f"sub-0{i}" for i in
                                                                                          range(1, 6)]
    assert read_meta(os.path.join(tmp_path, "regex", "slices.h5"))["cases"]["patient_id"][:2] == ["sub-01", "sub-01"]
    shutil.rmtree(raw)
    raw = _sessions_raw(tmp_path, patients={f"sub-{k // 2 + 1:02d}_ses-{k % 2 + 1}": f"sub-{k // 2 + 1:02d}"
                                            for k in range(9)})
    _, sp = preprocess(scripts, "nnunet", raw, str(tmp_path / "json"))
    assert "repeated scans" not in capsys.readouterr().out
    assert json.load(open(sp)) == splits                                    # the same subjects: the same split


def test_subjects_from_files_and_their_errors(tmp_path):
    from common.raw import read_subjects
    ids = ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    want = {"sub-01_ses-1": "A", "sub-01_ses-2": "A", "sub-02_ses-1": "B"}
    (tmp_path / "map.json").write_text(json.dumps({**want, "sub-09_ses-1": "C"}))          # extra ids are fine
    (tmp_path / "map.csv").write_text("case,subject\n" + "".join(f"{c},{s}\n" for c, s in want.items()))
    assert read_subjects(str(tmp_path / "map.json"), ids) == want
    assert read_subjects(str(tmp_path / "map.csv"), ids) == want
    assert read_subjects(r"^(sub-\d+)", ids) == {c: c[:6] for c in ids}
    (tmp_path / "short.csv").write_text("case,subject\nsub-01_ses-1,A\n")
    (tmp_path / "cols.csv").write_text("id,who\nsub-01_ses-1,A\n")
    for spec, msg in ((str(tmp_path / "short.csv"), r"no subject for case\(s\) \['sub-01_ses-2', 'sub-02_ses-1'\]"),
                      (str(tmp_path / "cols.csv"), "needs the columns 'case' and 'subject'"),
                      (str(tmp_path / "gone.json"), "gone.json: no such file"),
                      (r"^sub-\d+", "needs a group"),
                      (r"^(sub-\d+", "neither a mapping file nor a regular expression"),
                      (r"^(sub-0[2-9])", r"finds no subject in case id\(s\) \['sub-01_ses-1', 'sub-01_ses-2'\]")):
        with pytest.raises(InputError, match=msg):
            read_subjects(spec, ids)


def test_repeated_scan_warning_only_where_ids_say_so():
    from common.raw import Case, repeated_scans
    own = lambda ids: [Case(i, i, [], None, "mri") for i in ids]          # noqa: E731  (each case its own patient)
    for ids in (["case_00000", "case_00001", "case_00002"], ["PHANTOM_000", "PHANTOM_001"], ["amos_0001", "amos_0502"],
                ["hospA_001", "hospA_002", "hospB_001"], ["BraTS2021_00000", "BraTS2021_00001"]):
        assert repeated_scans(own(ids)) is None, ids
    for ids in (["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"], ["p1_ED", "p1_ES", "p2_ED", "p2_ES"],
                ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001", "BraTS-GLI-00002-000"],
                ["pat01_tp1", "pat01_tp2", "pat02_tp1"], ["s12_1", "s12_2", "s13_1"]):
        assert "repeated scans" in repeated_scans(own(ids)), ids
    acdc = [Case(f"patient00{p}_frame{f}", f"patient00{p}", [], None, "mri") for p in (1, 2) for f in ("01", "12")]
    assert repeated_scans(acdc) is None                                    # the layout groups the frames already


def test_brats2023_time_points_are_one_patient(tmp_path):
    from common.raw import list_cases
    raw = str(tmp_path / "raw")
    write_phantom(raw, "brats2023", 2, seed=0, size=32)
    src = os.path.join(raw, "BraTS-GLI-00000-000")
    dst = os.path.join(raw, "BraTS-GLI-00000-001")                        # a second time point of patient 00000
    os.makedirs(dst)
    for f in os.listdir(src):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f.replace("-000-", "-001-")))
    info = list_cases("brats", raw)
    assert {c.case_id: c.patient_id for c in info.cases} == {"BraTS-GLI-00000-000": "BraTS-GLI-00000",
                                                             "BraTS-GLI-00000-001": "BraTS-GLI-00000",
                                                             "BraTS-GLI-00001-000": "BraTS-GLI-00001"}


def test_converter_keeps_subjects_together(tmp_path, scripts):
    """convert_to_nnunet.py: --subjects (and, with --splits, 01's patient_of) become dataset.json's "patients", and
    the five folds draw subjects; --subjects against a --splits that recorded others is refused."""
    conv = load_script("scripts/convert_to_nnunet")
    raw = str(tmp_path / "raw")
    write_phantom(raw, "kits", 8, seed=1, size=32)
    subject = {f"case_{k:05d}": f"s{k // 2}" for k in range(8)}                 # four subjects of two scans
    (tmp_path / "map.json").write_text(json.dumps(subject))
    nn = str(tmp_path / "Dataset601_KiTS")
    conv.main(conv.get_args(["--dataset", "kits", "--raw", raw, "--out", nn, "--subjects", str(tmp_path / "map.json")]))
    assert json.load(open(os.path.join(nn, "dataset.json")))["patients"] == subject
    folds = json.load(open(os.path.join(nn, "splits_final.json")))
    assert len(folds) == 4 and sorted(c for f in folds for c in f["val"]) == sorted(subject)
    for f in folds:
        assert not {subject[c] for c in f["train"]} & {subject[c] for c in f["val"]}
    _, sp = preprocess(scripts, "kits", raw, str(tmp_path / "data"), "--subjects", str(tmp_path / "map.json"))
    nn2 = str(tmp_path / "Dataset602_KiTS")
    conv.main(conv.get_args(["--dataset", "kits", "--raw", raw, "--out", nn2, "--splits", sp]))
    assert json.load(open(os.path.join(nn2, "dataset.json")))["patients"] == subject
    (tmp_path / "other.json").write_text(json.dumps({c: c for c in subject}))
    with pytest.raises(InputError, match="other patients than --splits"):
        conv.main(conv.get_args(["--dataset", "kits", "--raw", raw, "--out", str(tmp_path / "Dataset603_KiTS"),
                                 "--splits", sp, "--subjects", str(tmp_path / "other.json")]))
