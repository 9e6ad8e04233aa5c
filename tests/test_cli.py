"""What a new user meets: one-line errors for wrong paths in every stage, the crop rule, devices, flag
spellings, --help that shows every default in plain words, the LTH's ETA, and the checkpoint / slices.h5 formats
kept in one place each."""
import argparse
import ast
import json
import os
import re
import subprocess
import sys

import h5py
import pytest
import torch

from common.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from common.data import CASE_STRINGS, CASE_TABLES, FILE_ATTRS, read_meta
from common.iac import EDGES, OPS
from common.search import expected_stop
from common.runs import cli
from common.utils import InputError, pick_device
from conftest import ROOT, data_args, load_script
from test_iac import GENO


def one_line_error(capsys, scripts, stage, argv):
    """Run a stage through cli() as the command line does; returns its stderr, checked to be one error line."""
    m = scripts[stage]
    with pytest.raises(SystemExit) as exit_:
        cli(m.main, m.get_args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1].startswith("error: ") and "Traceback" not in "".join(err), err
    return err[-1]


def test_wrong_paths_are_one_line_errors(tmp_path, capsys, scripts, acdc, backbone):
    data, splits = data_args(acdc)[1], data_args(acdc)[3]
    ckpt = os.path.join(backbone, "ckpt_best.pt")
    nope = str(tmp_path / "nope")
    cases = [
        ("01_preprocess", ["--dataset", "acdc", "--raw", nope, "--out", str(tmp_path / "o1")], nope),
        ("02_pretrain", ["--data", nope, "--splits", splits, "--out", str(tmp_path / "o2")], "--data " + nope),
        ("02_pretrain", ["--data", data, "--splits", nope, "--out", str(tmp_path / "o2")], "--splits " + nope),
        ("02_pretrain", ["--data", data, "--splits", splits, "--encoder_weights", nope, "--out", str(tmp_path / "o2"),
                         "--encoder", "resnet50"], "--encoder_weights " + nope),
        ("02_pretrain", ["--data", data, "--splits", splits, "--out", str(tmp_path / "o2b"), "--resume"],
         "no ckpt_last.pt"),
        ("03_search", ["--backbone", nope, "--data", data, "--splits", splits, "--out", str(tmp_path / "o3")],
         "--backbone " + nope),
        ("03_search", ["--backbone", ckpt, "--data", data, "--splits", splits, "--out", str(tmp_path / "o3"),
                       "--device", "tpu"], "--device tpu"),
        ("04_finetune", ["--backbone", ckpt, "--genotype", nope, "--data", data, "--splits", splits,
                         "--out", str(tmp_path / "o4")], "--genotype " + nope),
        ("05_evaluate", ["--data", data, "--splits", splits, "--run", f"r={nope}", "--out", str(tmp_path / "o5")],
         nope),
        ("05_evaluate", ["--search", f"s={nope}", "--out", str(tmp_path / "o5")], nope),
    ]
    for stage, argv, named in cases:
        assert named in one_line_error(capsys, scripts, stage, argv), (stage, argv)
    bad_theta0 = tmp_path / "g"
    bad_theta0.mkdir()
    json.dump({**GENO, "search": {"mode": "lth"}}, open(bad_theta0 / "genotype.json", "w"))
    msg = one_line_error(capsys, scripts, "04_finetune", ["--backbone", ckpt, "--genotype",
                                                          str(bad_theta0 / "genotype.json"), "--theta0", ckpt,
                                                          *data_args(acdc), "--out", str(tmp_path / "o6")])
    assert "--theta0" in msg and "not a theta0 checkpoint" in msg


def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "02_pretrain.py", "--data", str(tmp_path / "x.h5"), "--splits",
                        str(tmp_path / "s.json"), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'x.h5'}: no such file (the slices.h5 "
                                             "of 01_preprocess.py)"]


def test_crop_must_be_a_multiple_of_32(tmp_path, capsys, scripts, acdc):
    msg = one_line_error(capsys, scripts, "01_preprocess", ["--dataset", "acdc", "--raw", acdc[0], "--out",
                                                            str(tmp_path / "o"), "--crop", "48", "100"])
    assert "multiples of 32" in msg and "--crop 64 128" in msg
    assert not os.path.exists(tmp_path / "o")                       # refused before anything is written


def test_devices(capsys):
    assert pick_device("cpu").type == "cpu"
    auto = pick_device("auto")
    said = capsys.readouterr().out
    assert said.startswith(f"device: {auto.type}") and ("because" in said or "chosen by --device auto" in said)
    with pytest.raises(InputError, match="not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: .*use --device cpu or auto"):
            pick_device("cuda")
    else:
        with pytest.raises(InputError, match="only .* CUDA GPU"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_precision_switches_auto_on_off(scripts, acdc):
    """--amp / --channels_last: auto (on with CUDA only), on (the CPU too: the GPU path), off; the bare flag (which
    meant auto before) is an error, the --no- spellings are off; args.json of older runs (True / False) reads as
    auto / off."""
    from common.utils import precision, switch_on
    m = scripts["02_pretrain"]
    base = data_args(acdc) + ["--out", "x"]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    a = m.get_args(base)
    assert (a.amp, a.channels_last) == ("auto", "auto")
    assert precision(a, cpu) == (False, False) and switch_on(a.amp, gpu) and switch_on(a.channels_last, gpu)
    assert precision(m.get_args(base + ["--amp", "on", "--channels_last", "on"]), cpu) == (True, True)
    for bare in (["--amp"], ["--channels-last"]):
        with pytest.raises(SystemExit):
            m.get_args(base + bare)
    for flag in ("--no-channels-last", "--no-channels_last", "--channels_last=off"):
        assert not switch_on(m.get_args(base + [flag]).channels_last, gpu)
    assert m.get_args(base + ["--no-channels-last", "--channels_last", "on"]).channels_last == "on"
    assert not switch_on(m.get_args(base + ["--no-amp"]).amp, gpu) and not switch_on(False, gpu)
    assert switch_on(True, gpu) and not switch_on(True, cpu)
    with pytest.raises(SystemExit):
        m.get_args(base + ["--amp", "maybe"])
    assert scripts["05_evaluate"].get_args(["--out", "x", "--no-channels-last"]).channels_last == "off"


def test_lth_eta_from_the_pruning_rate():
    full, cap = len(EDGES) * len(OPS), 200
    assert expected_stop([full] * 16, cap) == cap                    # nothing pruned yet: the cap
    # pruning began at epoch 17 (index 16): 18 ops in 2 epochs -> 9 per epoch; 80 - 14 = 66 left -> 8 more epochs
    assert expected_stop([full] * 16 + [90, 80], cap) == 18 + 8
    assert expected_stop([full] * 16 + [97], 20) == 20               # capped
    assert expected_stop([full, len(EDGES)], cap) == 2               # one op per edge: this is the last epoch


def test_checkpoint_kinds_and_legacy_genotype(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint({"kind": "other"}, str(tmp_path / "x.pt"))
    from common.backbones import UNet
    from common.checkpoints import cell_config
    from common.iac import IACSkips
    model = UNet("base", 1, 3, "ref", width=8)
    model.set_skips(IACSkips(GENO, model.skip_channels, model.up_channels))
    cfg = {**model.config, **cell_config(GENO, None)}
    assert cfg["genotype"] == {"edges": GENO["edges"], "concat": [2, 3, 4, 5]}
    for genotype in (cfg["genotype"], GENO["edges"]):               # the dict, and the edges list of older files
        path = str(tmp_path / "ft.pt")
        save_checkpoint({"kind": "finetune", "config": {**cfg, "genotype": genotype}, "model": model.state_dict()},
                        path)
        rebuilt = model_from_checkpoint(load_checkpoint(path, "finetune"))
        x = torch.randn(1, 1, 32, 32)
        model.eval()
        rebuilt.eval()
        torch.testing.assert_close(rebuilt(x), model(x))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_slices_h5_schema(acdc):
    path = os.path.join(acdc[1], "slices.h5")
    meta = read_meta(path)
    with h5py.File(path) as f:
        assert set(f.attrs) == set(FILE_ATTRS)
        assert set(f["cases"]) == set(CASE_STRINGS) | set(CASE_TABLES)
    n = len(meta["cases"]["case_id"])
    assert all(len(meta["cases"][k]) == n for k in CASE_STRINGS + CASE_TABLES)
    assert json.loads(meta["cases"]["source"][0])[-1].endswith("_gt.nii.gz")


# --------------------------------------------------------------------------- --help
HELP_SCRIPTS = ("01_preprocess.py", "02_pretrain.py", "03_search.py", "04_finetune.py", "05_evaluate.py", "predict.py",
                "grid.py", "scripts/convert_to_nnunet.py")
STAGE_NAMES = {"01_preprocess.py": "Preprocessing (01)", "02_pretrain.py": "Stage I (02, the U-Net)",
               "03_search.py": "Stage II (03, the search)", "04_finetune.py": "Stage III (04, the cell)",
               "05_evaluate.py": "Evaluation (05)"}
GREEK = re.compile(r"[\u0370-\u03ff]|\bw'")                       # a symbol: α, β, τ0, κ, γ, ε, θ0, w' ...
SHORTHAND = ("(chosen)", "lean step", "(default: None)", "(default: [])", "(default: False)")


class Built(Exception):
    """Raised by parse_args to hand over the parser get_args built."""


def parser_of(script, monkeypatch):
    """The argparse parser of a script, as its get_args builds it (stopped before it parses anything)."""
    def grab(self, args=None, namespace=None):
        raise Built(self)
    module = load_script(script[:-3])
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(Built) as built:
            module.get_args([])
    return built.value.args[0]


def help_entries(text):
    """--help output -> {first word of an option's entry (e.g. --crop, config): its text on one line}."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  \S", line):                                  # an entry starts at two spaces' indent
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith("   ") and line.strip():    # its help goes on, further indented
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def shown(default):
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_help_shows_every_default_in_plain_words(script, monkeypatch):
    """`python SCRIPT --help` (a subprocess, as a user runs it): every option with a default shows it as typed,
    "(default: 256 256)"; one with default None says in words what leaving it out does (never "(default: None)");
    every help starts in words and its symbols (α, τ0, w' ...) stand in parentheses after them; the usage examples
    of the module docstring print intact, backslash continuations included; the stages name themselves alike."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="100", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    out, parser = r.stdout, parser_of(script, monkeypatch)
    entries = help_entries(re.split(r"\n(?:positional arguments|options):\n", out, maxsplit=1)[1])
    for action in parser._actions:
        invocation = parser._get_formatter()._format_action_invocation(action)   # e.g. "--crop H W"
        key = invocation.split()[0].rstrip(",")
        if action.help == argparse.SUPPRESS:
            assert key not in entries, f"{script}: {key} is hidden"
            continue
        entry = entries[key]
        assert entry.startswith(invocation), (entry, invocation)
        words = entry[len(invocation):].strip()
        where = f"{script} {key}: {entry!r}"
        assert not any(s in entry for s in SHORTHAND), where
        no_brackets = words
        while re.search(r"\([^()]*\)", no_brackets):
            no_brackets = re.sub(r"\([^()]*\)", "", no_brackets)
        assert not GREEK.search(no_brackets), f"{where}: a symbol outside parentheses"
        plain = [w for w in re.findall(r"[^\s]+", no_brackets) if not w.startswith("--")]
        assert plain and re.match(r"[A-Za-z]", plain[0]), f"{where}: starts with a symbol"
        assert len(re.findall(r"(?<![\w./-])[A-Za-z][a-z'-]+\b", words)) >= 2, f"{where}: no words"
        if not action.option_strings or action.nargs == 0:
            continue
        if action.default is None or (isinstance(action.default, list) and not action.default):
            assert action.required or re.search(r"default|needed|required|repeatable", entry), \
                f"{where}: say what leaving it out does"
        else:
            assert f"(default: {shown(action.default)}" in entry, where
    source = open(os.path.join(ROOT, script)).read()
    docstring = ast.get_source_segment(source, ast.parse(source).body[0].value).splitlines()
    for i, line in enumerate(docstring):
        if line.endswith("\\"):
            assert f"{line}\n{docstring[i + 1]}\n" in out, f"{script}: usage line {line!r} not printed intact"
    if script in STAGE_NAMES:
        assert out.split("\n\n", 2)[1].startswith(STAGE_NAMES[script]), f"{script}: name it as the other stages do"


def test_one_meaning_per_flag_name(monkeypatch):
    """A flag shared by several scripts takes the same number of values and overlapping choices in each (05's
    --split test|val beside 01's --split random|official was two meanings of one name; 05 says --subset now), and no
    script reads an abbreviation (05's --split would have been taken for --splits)."""
    seen = {}
    for script in HELP_SCRIPTS:
        if script == "grid.py":                                     # subcommands; its flags are its own
            continue
        parser = parser_of(script, monkeypatch)
        assert parser.allow_abbrev is False, script
        for action in parser._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, []).append((script, action.nargs, set(action.choices or ())))
    shared = {flag: uses for flag, uses in seen.items() if len(uses) > 1}
    assert {"--data", "--out", "--device", "--amp"} <= set(shared)
    for flag, uses in shared.items():
        assert len({nargs for _, nargs, _ in uses}) == 1, (flag, uses)
        with_choices = [choices for _, _, choices in uses if choices]
        assert all(a & b for a in with_choices for b in with_choices), (flag, uses)
    evaluate = load_script("05_evaluate")
    assert evaluate.get_args(["--out", "x", "--subset", "val"]).subset == "val"
    with pytest.raises(SystemExit):
        evaluate.get_args(["--out", "x", "--split", "test"])


def test_help_check_sees_the_continuations():
    """The usage examples of 03 and 05 span lines with backslashes (what the --help test checks is there)."""
    for script, n in (("03_search.py", 1), ("05_evaluate.py", 2), ("04_finetune.py", 1)):
        source = open(os.path.join(ROOT, script)).read()
        lines = ast.get_source_segment(source, ast.parse(source).body[0].value).splitlines()
        assert sum(line.endswith("\\") for line in lines) == n, script


def test_processes_and_its_old_name(scripts):
    """01's --processes (parallel volumes); --workers, its old name, still works and is not in --help."""
    m = scripts["01_preprocess"]
    assert m.get_args(["--processes", "3"]).processes == 3 and m.get_args(["--workers", "0"]).processes == 0
    assert m.get_args([]).processes >= 1 and not hasattr(m.get_args([]), "workers")
