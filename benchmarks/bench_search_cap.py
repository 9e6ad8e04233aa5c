"""Search cost against the cap on real MRI (#19, goal: full / LTH search time >= 4x in the same run): both searches of
bench_method.py's study again, on its frozen ref U-Nets and data, with a longer cap and warm-up, every search of all
seeds side by side (so full and LTH share the cores alike while both run), then 05_evaluate.py's search-cost table.

    python benchmarks/bench_search_cap.py --study bench_runs/method --cap 60 --warmup 10 [--seeds 0 1 2] [--record]

Only the searches (their cells were measured at the study's cap); runs already done are kept.
"""
import argparse
import os
import subprocess
import sys
import time

from _common import ROOT, load_script, machine, record


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=os.path.join(ROOT, "bench_runs", "method"), help="bench_method.py's --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cap", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cell_output", default="replace")
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    d = f"{a.study}/data"
    tag = f"cap{a.cap}" + ("" if a.cell_output == "replace" else f"_{a.cell_output}")
    runs, procs, t0 = {}, [], time.time()
    for seed in a.seeds:
        for mode in ("full", "lth"):
            out = f"{a.study}/seed{seed}/search_{mode}_{tag}"
            runs[(seed, mode)] = out
            if os.path.isfile(f"{out}/done.json"):
                continue
            cmd = [sys.executable, os.path.join(ROOT, "03_search.py"), "--backbone", f"{a.study}/seed{seed}/ref/ckpt_best.pt",
                   "--data", f"{d}/slices.h5", "--splits", f"{d}/splits.json", "--mode", mode, "--epochs", str(a.cap),
                   "--warmup", str(a.warmup), "--batch_size", str(a.batch), "--cell_output", a.cell_output,
                   "--seed", str(seed), "--workers", "0", "--out", out, "--overwrite"]
            log = open(f"{out}.log", "w")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(os.environ, OMP_NUM_THREADS="1")))
    for pr in procs:
        if pr.wait():
            raise SystemExit(f"error: a search failed ({pr.returncode}); see its .log beside the run folder")
    ev = load_script("05_evaluate")
    out = f"{a.study}/eval_{tag}"
    searches = [x for (_, mode), run in sorted(runs.items()) for x in ("--search", f"{mode}={run}")]
    ev.main(ev.get_args([*searches, "--data", f"{d}/slices.h5", "--splits", f"{d}/splits.json", "--device", "cpu",
                         "--out", out]))
    table = open(f"{out}/search_cost.md").read()
    if a.record:
        record(f"Search cost against the cap on the warped-template MRI, cap {a.cap} (bench_search_cap.py)",
               f"Machine: {machine()}; the {len(runs)} searches side by side, one thread each (full and LTH slowed "
               f"alike while both ran). bench_method.py's data and frozen ref U-Nets (seeds {a.seeds}), cap {a.cap}, "
               f"warm-up {a.warmup}, batch {a.batch}, --cell_output {a.cell_output}, the default γ and τ0 rule; "
               f"{time.time() - t0:.0f} s in all.\n\n{table}\n")


if __name__ == "__main__":
    main()
