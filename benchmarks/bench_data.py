"""Preprocessing (volumes/s) and loader throughput (slices/s, batch 128, 256x256, 2 workers)."""
import shutil
import subprocess
import sys
import tempfile
import time

from _common import ROOT, machine, record

import torch  # noqa: E402

from common.data import SliceDataset, load_splits  # noqa: E402


def main():
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    py = sys.executable
    subprocess.run([py, "01_preprocess.py", "--make_phantom", f"{tmp}/raw", "--layout", "kits", "--patients", "24",
                    "--phantom_size", "256", "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
    t = time.time()
    subprocess.run([py, "01_preprocess.py", "--dataset", "kits", "--raw", f"{tmp}/raw", "--out", f"{tmp}/data",
                    "--crop", "256", "256", "--workers", "2"], cwd=ROOT, check=True, capture_output=True)
    pre_s = time.time() - t
    splits = load_splits(f"{tmp}/data/splits.json")
    ids = splits["train"] + splits["val"] + splits["test"]
    rows = []
    for cache in (False, True):
        ds = SliceDataset(f"{tmp}/data/slices.h5", ids, cache=cache)
        loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=2)
        n, t = 0, time.time()
        for _ in range(2):
            for x, _y in loader:
                n += len(x)
        rows.append((cache, n / (time.time() - t), len(ds)))
    body = (f"Machine: {machine()}\n\n| what | result |\n|---|---|\n"
            f"| preprocess 24 KiTS-layout phantom volumes (~256x256xZ, 2 workers) | {24 / pre_s:.1f} volumes/s |\n")
    for cache, sps, n in rows:
        body += f"| loader, batch 128, 256x256, 2 workers, {'in-memory cache' if cache else 'from HDF5'} ({n} slices) | {sps:,.0f} slices/s |\n"
    body += "\nGoal: at least 2,000 slices/s of 256x256 so the loader never starves a GPU.\n"
    record("Data (bench_data.py)", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
