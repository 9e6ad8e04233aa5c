"""examples/monai_basicunet.py on a tiny task with copies of iac.py and lth.py only, and lth.end_of_epoch."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import lth
from common.iac import EDGES, OPS, IACSearchSkips, read_genotype, validate_genotype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "monai_basicunet.py")
# run a script as `python SCRIPT ARGS` would (its folder first on sys.path), then write every loaded module's
# file, even when the script fails
RUNNER = """import json, os, runpy, sys
script, modules = sys.argv[1], sys.argv[2]
sys.argv, sys.path[0] = [script] + sys.argv[3:], os.path.dirname(os.path.abspath(script))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(modules, "w") as f:
        json.dump({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}, f)
"""
TINY = ["--features", "8", "8", "16", "16", "32", "8", "--n_train", "32", "--n_test", "16", "--batch_size", "16",
        "--pretrain_epochs", "8", "--search_epochs", "30", "--warmup", "2", "--gamma", "1.5",
        "--finetune_epochs", "25"]


def run_example(cwd, script, args, modules):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", RUNNER, script, str(modules), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_monai_example_with_copied_files_only(tmp_path):
    """The chain (stage I, LTH search to its stop rule, θ0 reset, stage III, prediction) with the example,
    iac.py and lth.py copied into a folder outside the repository: nothing else of the project is imported."""
    pytest.importorskip("monai")
    ex = tmp_path / "ex"
    ex.mkdir()
    for src in (EXAMPLE, os.path.join(ROOT, "common", "iac.py"), os.path.join(ROOT, "common", "lth.py")):
        shutil.copy(src, ex)
    out, modules = tmp_path / "out", tmp_path / "modules.json"
    r = run_example(tmp_path, str(ex / "monai_basicunet.py"), TINY + ["--out", str(out)], modules)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    loaded = json.loads(modules.read_text())
    assert os.path.realpath(loaded["iac"]) == os.path.realpath(ex / "iac.py")
    assert os.path.realpath(loaded["lth"]) == os.path.realpath(ex / "lth.py")
    assert "monai" in loaded
    project = sorted(n for n in loaded if n.split(".")[0] in ("common", "nnunet_iac"))
    venv = os.path.realpath(sys.prefix) + os.sep                         # the libraries may live in ROOT/.venv
    files = {n: os.path.realpath(f) for n, f in loaded.items() if f and os.path.isabs(f)}
    inside = sorted(n for n, f in files.items() if f.startswith(ROOT + os.sep) and not f.startswith(venv))
    assert project == [] and inside == [], (project, inside)

    s = json.loads((out / "summary.json").read_text())
    validate_genotype(s["genotype"])                                     # 2 inputs per node, known ops
    assert read_genotype(str(out / "genotype.json"))["edges"] == s["genotype"]["edges"]
    assert s["search"]["stopped_early"] and s["search"]["epochs_run"] < s["search"]["epochs_cap"]
    assert s["search"]["lth"]["tau0"] > 0 and s["search"]["lth"]["js_support"] == "common"
    assert s["skip_channels"] == [8, 8, 16, 16] and s["up_channels"] == [8, 8, 8, 16]   # UpCat halves 16 -> 8
    assert s["dice_cells"] > s["dice_chance"] + 0.2, s                   # stage III learnt the task
    assert s["dice_cells"] > s["dice_theta0"] + 0.2, s                   # ... from the cells at θ0
    assert s["pred_shape"] == [s["input_shape"][0], *s["input_shape"][2:]]   # one (H, W) mask per input
    assert "stopped: one op per edge" in r.stdout and "stage III epoch 25/25" in r.stdout


def test_monai_example_from_the_repository_help(tmp_path):
    """Run where it lies, the example imports iac and lth from common/ as top-level modules (never `common.*`);
    --help shows every flag's default."""
    pytest.importorskip("monai")
    modules = tmp_path / "modules.json"
    r = run_example(ROOT, EXAMPLE, ["--help"], modules)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(modules.read_text())
    assert os.path.realpath(loaded["iac"]) == os.path.realpath(os.path.join(ROOT, "common", "iac.py"))
    assert os.path.realpath(loaded["lth"]) == os.path.realpath(os.path.join(ROOT, "common", "lth.py"))
    assert not [n for n in loaded if n.split(".")[0] in ("common", "nnunet_iac")]
    assert "level 0 is the finest skip" in r.stdout
    options = r.stdout[r.stdout.index("options:"):].split("\n  --")[1:]       # after -h: one entry per flag
    assert len(options) == 21 and all("(default: " in " ".join(o.split()) for o in options), options


def moved(alpha, scale, edges, gen):
    """α with a random move of size `scale` on `edges`."""
    a = alpha.clone()
    a[edges] += scale * torch.randn(len(edges), len(OPS), generator=gen, dtype=a.dtype)
    return a


def test_end_of_epoch_calibrates_prunes_and_stops():
    """lth.end_of_epoch: nothing before the last warm-up epoch, which only records p; the next test sets τ0 and
    prunes nothing; then stable edges lose their ops (modules gone), unstable ones grow τ by γ; it stops when every
    edge has one op. An optimizer built before a prune still holds the removed weights (rebuild it)."""
    torch.manual_seed(0)
    skips = IACSearchSkips([4], [4])
    state = lth.LTHState(len(EDGES), tau0_rel=0.5, gamma=2.0)
    gen = torch.Generator().manual_seed(0)
    for epoch in (0, 1):                                                 # warm-up of 3: nothing happens
        info = lth.end_of_epoch(skips, state, epoch, warmup=3)
        assert info["js"] is None and state.prev is None and info["pruned"] == [] and not info["stopped"]
    info = lth.end_of_epoch(skips, state, 2, warmup=3)                   # last warm-up epoch: records p
    assert info["js"] is None and state.prev is not None and state.tau is None
    with torch.no_grad():
        skips.alpha.copy_(moved(skips.alpha, 1e-2, list(range(len(EDGES))), gen))
    info = lth.end_of_epoch(skips, state, 3, warmup=3)                   # first after warm-up: τ0, no prune
    assert info["pruned"] == [] and state.tau0 == pytest.approx(0.5 * float(info["js"].median()))
    assert int(skips.op_mask.sum()) == len(EDGES) * len(OPS)

    w_opt = torch.optim.SGD(skips.weight_parameters(), lr=0.01)
    stable, unstable = list(range(7)), list(range(7, len(EDGES)))
    with torch.no_grad():                                                # edges 0-6 still, 7-13 move a lot
        skips.alpha.copy_(moved(skips.alpha, 1.0, unstable, gen))
    tau = state.tau.clone()
    I = skips.importance()
    info = lth.end_of_epoch(skips, state, 4, warmup=3)
    assert sorted({e for e, _ in info["pruned"]}) == stable
    for e, o in info["pruned"]:
        assert OPS[o] not in skips.cells[0].edges[str(e)].ops and not skips.op_mask[e, o]
        assert I[e, o] < I[e][skips.op_mask[e]].max()                     # never the edge's best op
    assert torch.allclose(state.tau[unstable], 2.0 * tau[unstable]) and torch.equal(state.tau[stable], tau[stable])
    held = {id(p) for g in w_opt.param_groups for p in g["params"]}
    assert len(held) > len({id(p) for p in skips.weight_parameters()})  # the old optimizer keeps pruned weights

    for epoch in range(5, 5 + len(OPS)):                                 # α still: every edge stable, ≥ 1 op each
        info = lth.end_of_epoch(skips, state, epoch, warmup=3)
        if info["stopped"]:
            break
    assert info["stopped"] and lth.all_edges_single(skips.op_mask)
    validate_genotype(skips.derive_genotype())


def test_the_projects_search_loop_uses_the_copyable_helper():
    """common/search.py's end_of_epoch: lth mode is lth.end_of_epoch itself (one copy of the JS test, prune and
    stop, tested above by hand); full mode records the importance and never prunes or stops."""
    search = pytest.importorskip("common.search")
    torch.manual_seed(1)
    a = IACSearchSkips([4, 8], [8, 4])
    b = copy.deepcopy(a)
    sa, sb = (lth.LTHState(len(EDGES), tau0=1.0, gamma=1.1) for _ in range(2))   # every edge stable at every test
    calls = []
    real = search.lth_end_of_epoch
    search.lth_end_of_epoch = lambda *args: calls.append(args) or real(*args)
    try:
        pruned = [search.end_of_epoch(a, sa, "lth", epoch, 2)["pruned"] for epoch in range(4)]
    finally:
        search.lth_end_of_epoch = real
    assert real is lth.end_of_epoch
    assert [c[2] for c in calls] == [0, 1, 2, 3] and all(c[0] is a and c[1] is sa for c in calls)
    assert pruned[0] == pruned[1] == [] and pruned[2] and int(a.op_mask.sum()) < len(EDGES) * len(OPS)
    for epoch in range(40):
        ib = search.end_of_epoch(b, sb, "full", epoch, 2)
        assert ib["pruned"] == [] and not ib["stopped"] and ib["js"] is None
    assert bool(b.op_mask.all()) and torch.equal(ib["importance"], b.importance())
