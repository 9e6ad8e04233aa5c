"""What a search step keeps for its backward pass, counted before it runs (the plan for --checkpoint_edges auto and
03_search.py --dry_run).

    est = search_memory(model, skips, batch, in_channels, size, dtype)         # on the meta device: no memory used
    est["levels"][l] = {"stored": bytes, "checkpointed": bytes, "cell": bytes, "fine": bytes,    # kept per mode
                        "region": bytes, "cell_region": bytes, "fine_region": bytes}   # the most one region saves
                                                                                       # when recomputed
    est["rest"], est["params"]
    plan, need, fits = checkpoint_plan(est, budget)          # per level: False, True (edges), "cell" or "fine"
    plan, need, fits = choose_plan("auto" | "on" | "cell" | "fine" | "off", est, budget)  # what --checkpoint_edges runs

The count: one forward of the U-Net with its search cells and the loss, on the meta device (shapes only), under
saved_tensors_hooks; every storage the autograd graph keeps counts once (views share their storage), parameters
and buffers not at all, and the inputs a checkpointed region keeps for its recomputation are added; each outermost
region (and, for "fine", each region directly inside it) is run once more, unchecked, to count what it saves when the
backward pass recomputes it. Bytes saved inside
cell l's forward are level l's, the rest (the frozen decoder's ReLU masks, common/frozen.py; the loss) are "rest".
step_bytes() adds what a step holds besides (the largest recomputation, weights, a CUDA reserve), fitted to H200
peaks."""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from common.lean_cell import WHOLE_CELL, checkpoint_hook

GIB = 2 ** 30


def _key(t):
    return t.untyped_storage()._cdata


class SavedBytes:
    """saved_tensors_hooks counting each kept storage once, by the tag active when it was first saved."""

    def __init__(self, exclude=()):
        self.exclude = {_key(t) for t in exclude}
        self.kept, self.tag = {}, "rest"
        self.regions = {}                          # tag -> the most one outermost checkpointed region saves inside
        self.inner_regions = {}                    # ... one region directly inside an outermost one (if counted)

    def add(self, t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            k = _key(t)
            if k not in self.exclude and k not in self.kept:
                self.kept[k] = (t.untyped_storage().nbytes(), self.tag, t)    # held: the key stays unique
        return t

    def by_tag(self):
        out = {}
        for nbytes, tag, _ in self.kept.values():
            out[tag] = out.get(tag, 0) + nbytes
        return out

    @contextlib.contextmanager
    def counting(self, cells=(), depth=1):
        """Count inside this block; `cells[l]`'s forward is tagged l; checkpointed regions add their inputs, and each
        outermost region is run once more, unchecked, to count what its recomputation in backward saves (its own
        inner regions: their inputs) into `regions`; with depth 2, each region directly inside it the same way, into
        `inner_regions`."""
        state, max_depth = {"depth": 0, "into": self}, depth

        def checkpoint(fn, *args, **kw):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            into, depth = state["into"], state["depth"]
            if into is not None:                              # a region inside a checkpointed one keeps nothing itself
                for t in tensors:
                    into.add(t)
            try:
                if depth < max_depth:
                    inner = SavedBytes(exclude=tensors)
                    inner.exclude |= self.exclude
                    state.update(depth=depth + 1, into=inner)
                    with torch.autograd.graph.saved_tensors_hooks(inner.add, lambda t: t):
                        fn(*args)                             # the recomputation (BN statistics: on a copy)
                    into_regions = self.inner_regions if depth else self.regions
                    into_regions[self.tag] = max(into_regions.get(self.tag, 0), sum(inner.by_tag().values()))
                state.update(depth=depth + 1, into=None)
                return torch_checkpoint(fn, *args, **kw)
            finally:
                state.update(depth=depth, into=into)

        def enter(level):
            def pre(*_):
                self.tag = level
            return pre

        def leave(*_):
            self.tag = "rest"

        hooks = [h for level, cell in enumerate(cells) for h in
                 (cell.register_forward_pre_hook(enter(level)), cell.register_forward_hook(leave))]
        try:
            with checkpoint_hook(checkpoint), torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t):
                yield self
        finally:
            for h in hooks:
                h.remove()


def search_memory(model, skips, batch, in_channels, size, dtype=torch.float32, device="meta"):
    """Bytes kept for the backward pass of one search step, per cell level stored and checkpointed, and the rest.

    `model`, `skips`: the frozen U-Net and its LeanSearchSkips (on the CPU; copied to meta, left as they are);
    `dtype`: bfloat16 to stand for AMP (its convolutions keep bf16 activations); `device`: meta (shapes only, any
    size) or a real one (the same count, with the memory it takes: for checking the meta count)."""
    net = copy.deepcopy(model).to(device, dtype)
    skips = copy.deepcopy(skips)
    skips.cells.to(device, dtype)                             # α, β and the masks stay on the CPU (read in Python)
    net.train()
    net.freeze_backbone()                                     # as 03_search.py: backbone frozen, in eval mode
    n_levels = len(net.skip_channels)
    x = torch.randn(batch, in_channels, *size, device=device, dtype=dtype)
    y = torch.randint(0, net.config["num_classes"], (batch, *size), device=device)
    runs = {}
    for ckpt in MODES:
        for cell in skips.cells:
            cell.checkpoint_edges = ckpt
        net.set_skips(skips)
        params = [*net.parameters(), *net.buffers()]
        counter = SavedBytes(exclude=params)
        with counter.counting(skips.cells, depth=2 if ckpt == "fine" else 1):
            skips.prepare(None)
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y)                          # stands for SegLoss (same shapes)
            loss = loss + logits.float().softmax(1).mean()
        runs[ckpt] = counter.by_tag()
        runs[ckpt]["regions"], runs[ckpt]["inner_regions"] = counter.regions, counter.inner_regions
        runs[ckpt]["params"] = sum(p.numel() * p.element_size() for p in params)
        runs[ckpt]["cell_params"] = sum(p.numel() * p.element_size() for p in skips.parameters())
    levels = [{**{key: runs[mode].get(level, 0) for mode, key in MODES.items()},
               "region": runs[True]["regions"].get(level, 0), "cell_region": runs["cell"]["regions"].get(level, 0),
               "fine_region": runs["fine"]["inner_regions"].get(level, 0)} for level in range(n_levels)]
    return {"levels": levels, "rest": runs[False].get("rest", 0), "params": runs[False]["params"],
            "cell_params": runs[False]["cell_params"], "batch": batch, "size": list(size), "dtype": str(dtype)}


# What a step holds besides its kept bytes, fitted to the H200 peaks of the edge-by-edge LTH step with every edge
# checkpointed (bench_gpu.py in RESULTS.md, torch 2.11: base 29.8 GiB, VGG-16 49.1, ResNet-50 17.0, MobileNetV3 8.4,
# EfficientNetV2-S 9.4, -M 9.6; this model gives them within 7%): while a checkpointed region is recomputed in the
# backward pass, RECOMPUTE_FACTOR x what it saves inside (its activations, then their gradients and the backward's
# temporaries), and CUDA_RESERVE at any time (cuDNN workspaces, the allocator's rounding). bench_step_memory.py
# --calibrate checks the count on a CPU step (without the reserve).
RECOMPUTE_FACTOR = 1.6
CUDA_RESERVE = GIB
BUDGET_SHARE = 0.9                     # of the free GPU memory, what a plan may use


MODES = {False: "stored", True: "checkpointed", "cell": "cell", "fine": "fine"}   # a level's mode -> its key
LABELS = {False: "stored", True: "edges checkpointed", "cell": "whole cell",          # ... its name in logs, tables
          "fine": "whole cell (op by op)"}
SETTINGS = {"off": False, "on": True, "cell": "cell", "fine": "fine"}   # --checkpoint_edges (auto: see choose_plan)


def plan_summary(plan):
    """The levels a plan checkpoints, for tables: "0 edges checkpointed, 2 whole cell", or "nothing"."""
    return ", ".join(f"{lv} {LABELS[m]}" for lv, m in enumerate(plan) if m) or "nothing"


def _recompute(lv, mode):
    """What recomputing one level holds at once in the backward pass: for edges, its largest region's recomputation;
    for a whole cell, the cell's own recomputed graph (its edges checkpointed inside) and then that ("fine": its
    smaller regions inside)."""
    if mode is False:
        return 0
    region = int(RECOMPUTE_FACTOR * lv["fine_region" if mode == "fine" else "region"])
    return region + (lv["cell_region"] if mode in WHOLE_CELL else 0)


def held_bytes(est):
    """What a step holds whatever its batch: weights, the cells' gradients (α, β are tiny; SGD keeps no state) and
    the CUDA reserve."""
    return est["params"] + est["cell_params"] + CUDA_RESERVE


def step_bytes(est, plan):
    """The plan's kept bytes (`plan`: per level False, True or "cell") plus what a step holds besides: held_bytes()
    and the largest level's recomputation in backward."""
    kept = est["rest"] + sum(lv[MODES[m]] for lv, m in zip(est["levels"], plan))
    recompute = max(_recompute(lv, m) for lv, m in zip(est["levels"], plan))
    return held_bytes(est) + kept + recompute


def checkpoint_plan(est, budget):
    """Per level False / True / "cell" / "fine" so the step fits `budget` bytes: nothing if it fits stored, else the
    level edges checkpointed whose saving is largest first, then whole cells the same way, then (the slowest, with
    the same kept bytes) the whole cells whose recomputation holds most, edge by edge. Returns (plan, bytes, fits)."""
    n = len(est["levels"])
    lvs = est["levels"]
    plan = [False] * n
    steps = [None] + [(lv, mode) for mode in (True, "cell") for lv in
                      sorted(range(n), key=lambda lv: lvs[lv][MODES[mode]] - lvs[lv]["stored"])]
    steps += [(lv, "fine") for lv in sorted(range(n), key=lambda lv: -_recompute(lvs[lv], "cell"))]
    for step in steps:
        if step is not None:
            plan[step[0]] = step[1]
        need = step_bytes(est, plan)
        if need <= budget:
            return plan, need, True
    return plan, need, False


def describe(est, plan=None, budget=None):
    """The estimate as lines of text (GiB), for --dry_run and the log."""
    lines = [f"backward memory estimate at batch {est['batch']}, {'x'.join(map(str, est['size']))}, {est['dtype']}: "
             f"weights {est['params'] / GIB:.2f} GiB, frozen decoder and loss {est['rest'] / GIB:.2f} GiB"]
    for lv, e in enumerate(est["levels"]):
        mark = "" if plan is None else f"  <- {LABELS[plan[lv]]}"
        lines.append(f"  cell level {lv}: stored {e['stored'] / GIB:.2f} GiB, edges checkpointed "
                     f"{e['checkpointed'] / GIB:.2f} GiB, whole cell {e['cell'] / GIB:.2f} GiB (recomputing "
                     f"{_recompute(e, 'cell') / GIB:.2f}, op by op {_recompute(e, 'fine') / GIB:.2f}){mark}")
    if plan is not None:
        lines.append(f"  step total (with this plan, and {CUDA_RESERVE / GIB:.0f} GiB for cuDNN and the allocator) "
                     f"~{step_bytes(est, plan) / GIB:.1f} GiB"
                     + (f" of {budget / GIB:.1f} GiB available" if budget is not None else ""))
    return lines


def gpu_budget(device, free=None):
    """What a plan may use on `device`: BUDGET_SHARE of its free memory (`free` bytes, unless the device's); None
    off CUDA (nothing to compare with)."""
    if device.type != "cuda":
        return None
    return BUDGET_SHARE * (torch.cuda.mem_get_info(device)[0] if free is None else free)


def fixed_plan(setting, n_levels):
    """--checkpoint_edges on / cell / fine / off: the same mode at every level (auto without a budget: off)."""
    return [SETTINGS.get(setting, False)] * n_levels


def choose_plan(setting, est, budget=None):
    """--checkpoint_edges `setting` for the estimate `est`: auto with a budget (bytes) is checkpoint_plan's choice,
    otherwise fixed_plan. Returns (plan, bytes, fits; fits is True without a budget)."""
    if setting == "auto" and budget is not None:
        return checkpoint_plan(est, budget)
    plan = fixed_plan(setting, len(est["levels"]))
    need = step_bytes(est, plan)
    return plan, need, budget is None or need <= budget


def plan_for_run(setting, device, model, skips, batch, size, amp, free=None):
    """The plan 03_search.py runs with: on CUDA with auto, choose_plan for gpu_budget(device, free); otherwise
    fixed_plan, without counting. Returns (one mode per level, lines for the log; none unless auto ran on CUDA)."""
    if setting != "auto" or device.type != "cuda":
        return fixed_plan(setting, len(skips.cells)), []
    est = search_memory(model, skips, batch, model.config["in_channels"], size, torch.bfloat16 if amp else
                        torch.float32)
    budget = gpu_budget(device, free)
    plan, need, fits = choose_plan(setting, est, budget)
    lines = describe(est, plan, budget)
    if not fits:
        lines.append("  does not fit even with every whole cell recomputed edge by edge: lower --batch_size (or "
                     "--cell_channels)")
    return plan, lines
