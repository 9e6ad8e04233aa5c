"""Helpers for the benchmark scripts: machine description and RESULTS.md sections."""
import importlib.util
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import torch

from common.iac import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")


def machine():
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {dev}, torch {torch.__version__}"


def load_script(name):
    """A script by its path from the project root without .py (e.g. '02_pretrain', 'scripts/convert_to_nnunet')
    imported as a module, to call main(get_args(argv)) in-process (benchmarks and tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name.replace('/', '_')}", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_op_per_edge(skips):
    """Prune all but one op per edge, as IAC-LTH leaves the supernet at its stop: edge e keeps op e mod 7, so every
    kind of op is there (keeping skip_connect everywhere would time an almost empty cell)."""
    for e in range(skips.op_mask.shape[0]):
        for o in range(len(OPS)):
            if o != e % len(OPS):
                skips.prune_op(e, o)


ARCHIVE = "# Archive"      # RESULTS.md's last part (superseded figures); a new section goes just above it


def record(section, body):
    """Write `## section` of RESULTS.md: replace the section of that heading where it stands, or insert a new one
    just above the archive (at the end of a file without one). RESULTS.md groups its sections under `# question`
    headings, so a section ends at the next `#` or `##` heading; headings inside `body` (05's tables bring
    `## ...`) are demoted to `####` so that they stay inside it. The section starts with the date and the command
    that wrote it. Written to a temporary name and renamed: a cut-off run leaves RESULTS.md as it was."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    body = re.sub(r"^#{1,3} ", "#### ", body.strip(), flags=re.M)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    made = f"*Recorded {time.strftime('%Y-%m-%d')} by `python {shlex.join([script, *sys.argv[1:]])}`.*"
    block = f"## {section}\n\n{made}\n\n{body}\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^#{{1,2}} |\Z)", re.S | re.M)
    archive = re.search(rf"^{re.escape(ARCHIVE)}$", text, re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: block, text, count=1)
    elif archive:
        text = text[:archive.start()] + block + text[archive.start():]
    else:
        text = text.rstrip() + "\n\n" + block
    with open(RESULTS + ".tmp", "w") as f:
        f.write(text.rstrip() + "\n")
    os.replace(RESULTS + ".tmp", RESULTS)
    print(block)


def run(args, threads=None):
    """Run a stage script with this interpreter from the project root (`threads`: OMP_NUM_THREADS);
    fail loudly, with the end of its error output."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def phantom_backbone(tmp, patients, size, epochs=15, batch_size=16):
    """ACDC phantom -> slices -> a width-8 base U-Net (TMP/ref); returns the data flags and splits.json path."""
    D = f"{tmp}/data"
    run(["01_preprocess.py", "--make_phantom", f"{tmp}/raw", "--layout", "acdc", "--patients", str(patients),
         "--phantom_size", str(size), "--seed", "0"])
    run(["01_preprocess.py", "--dataset", "acdc", "--raw", f"{tmp}/raw", "--out", D, "--crop", str(size), str(size)])
    data = ["--data", f"{D}/slices.h5", "--splits", f"{D}/splits.json", "--batch_size", str(batch_size)]
    run(["02_pretrain.py", *data, "--width", "8", "--epochs", str(epochs), "--out", f"{tmp}/ref"])
    return data, f"{D}/splits.json"
