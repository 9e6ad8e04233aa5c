"""Helpers for the benchmark scripts: machine description and RESULTS.md sections."""
import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")


def machine():
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {dev}, torch {torch.__version__}"


def record(section, body):
    """Replace (or append) `## section` in RESULTS.md with `body`."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\nWritten by `make bench`.\n"
    block = f"## {section}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"## {re.escape(section)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda m: block.rstrip() + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(text)
    print(block)
