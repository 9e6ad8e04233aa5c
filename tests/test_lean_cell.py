"""The search step the scripts run (common/lean_cell.py) pinned to the paper's cell (common/iac.py): the contract in
float64 (train mode, several search steps with prunes), in eval mode (exact) and under bf16 autocast (the dtype path of
every CUDA run, taken on the CPU), 2-D and 3-D, and through the U-Net; recomputation and the memory count."""
import copy

import pytest
import torch
import torch.nn.functional as F

from common.backbones import UNet
from common.iac import EDGES, OPS, IACSearchSkips
from common.lean_cell import LeanSearchSkips
from common.search import arch_optimizer, search_step, weight_optimizer
from common.utils import cpu_conv_guard

PRUNES = [(0, 1), (0, 2), (4, 3), (4, 6), (7, 0)] + [(1, o) for o in range(6)]


def pruned_pair(skip_channels, up_channels, dims=2, ckpt=False, seed=0):
    """The reference supernet and the lean one with the same weights, random α, β, PRUNES applied and edge 9 gone."""
    torch.manual_seed(seed)
    ref = IACSearchSkips(skip_channels, up_channels, dims=dims)
    lean = LeanSearchSkips(skip_channels, up_channels, dims=dims, checkpoint_edges=ckpt)
    with torch.no_grad():
        ref.alpha.normal_()
        ref.beta.normal_()
    for s in (ref, lean):
        for e, o in PRUNES:
            s.prune_op(e, o)
        s.prune_edge(9)
    lean.load_state_dict(ref.state_dict())
    return ref, lean


def running(s):
    return {n: b.clone() for n, b in s.named_buffers() if "running" in n or "num_batches" in n}


def test_contract_eval_mode_is_the_reference_exactly():
    """In eval mode the lean supernet gives the reference cell's output bit for bit (BatchNorm from running statistics)
    and leaves every running statistic alone, with and without autocast and checkpointing."""
    for dims, ckpt in ((2, False), (2, "cell"), (3, True)):
        size = (12, 12) if dims == 2 else (6, 6, 6)
        ref, lean = pruned_pair([8, 12], [16, 8], dims, ckpt)
        torch.manual_seed(1)
        xs = [(torch.randn(3, 8, *size), torch.randn(3, 16, *size)), (torch.randn(3, 12, *size), torch.randn(3, 8, *size))]
        for s in (ref, lean):                              # a training step first: non-trivial running statistics
            s.prepare(None)
            sum(s(lv, *x).square().mean() for lv, x in enumerate(xs)).backward()
        lean.load_state_dict(ref.state_dict())             # (equal to rounding; here bit for bit)
        ref.eval()
        lean.eval()
        before = running(lean)
        for amp in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                ref.prepare(None)
                lean.prepare(None)
                for lv, x in enumerate(xs):
                    a, b = ref(lv, *x), lean(lv, *x)
                    assert a.dtype == b.dtype and torch.equal(a, b), (dims, ckpt, amp, lv)
        after = running(lean)
        assert all(torch.equal(before[n], after[n]) for n in before)


def relative(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def concat(tensors, keys):
    return torch.cat([tensors[k].float().flatten() for k in keys])


def autocast_step(net, skips, x, y, amp, channels_last):
    """One search forward and backward through `net` (2-D U-Net) or, with net None, the skips alone (x: per level)."""
    skips = copy.deepcopy(skips)
    if net is not None:
        net = copy.deepcopy(net)
        net.set_skips(skips)
        net.train()
        net.freeze_backbone()                             # as 03_search.py: backbone in eval mode, cells training
        if channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        skips.prepare(None)
        out = net(x) if net is not None else torch.cat([skips(lv, *xl).flatten(1) for lv, xl in enumerate(x)], 1)
        loss = F.cross_entropy(out.float(), y) if net is not None else out.float().square().mean()
    loss.backward()
    return out, {n: p.grad for n, p in skips.named_parameters()}, running(skips)


@pytest.mark.parametrize("where", ["unet_2d", "skips_3d"])
def test_contract_under_bf16_autocast(where):
    """Under bf16 autocast (CUDA's dtype rules, here on the CPU) the lean step runs (today's main failed at its first
    forward: fp32 running statistics updated from bf16), its output has the reference's dtype, its running
    statistics stay float32, and its output, gradients (cell weights, α, β) and statistics differ from the reference
    step under the same autocast by no more than bf16 itself moves the reference from float32 (1.5x that). In float32
    the two agree to rounding. 2-D through the frozen U-Net with channels_last (stored and whole cells recomputed);
    3-D on the cells alone, every --checkpoint_edges mode; after prunes."""
    if where == "unet_2d":
        torch.manual_seed(0)
        net = UNet("base", 1, 3, width=8)
        net.freeze_backbone()
        skip_channels, up_channels = net.skip_channels, net.up_channels
        x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32))
        cpu_conv_guard(torch.device("cpu"), True, True)   # torch's oneDNN bf16 channels_last dilated-conv bug (utils)
    else:
        net, skip_channels, up_channels = None, [8, 12], [16, 8]
        torch.manual_seed(1)
        x, y = [(torch.randn(2, 8, 6, 6, 6), torch.randn(2, 16, 6, 6, 6)),
                (torch.randn(2, 12, 6, 6, 6), torch.randn(2, 8, 6, 6, 6))], None
    ref, _ = pruned_pair(skip_channels, up_channels, 2 if net is not None else 3)
    ref32, ref16 = (autocast_step(net, ref, x, y, amp, net is not None) for amp in (False, True))
    for ckpt in (False, True, "cell", "fine") if net is None else (False, "cell"):
        _, lean = pruned_pair(skip_channels, up_channels, 2 if net is not None else 3, ckpt)
        lean32, lean16 = (autocast_step(net, lean, x, y, amp, net is not None) for amp in (False, True))
        assert lean16[0].dtype == ref16[0].dtype == torch.bfloat16
        assert all(b.dtype == ref16[2][n].dtype for n, b in lean16[2].items())
        assert {b.dtype for n, b in lean16[2].items() if "running" in n} == {torch.float32}
        weights = [n for n in ref16[1] if n.startswith("cells")]
        stats = [n for n in ref16[2] if "running" in n]
        pairs = {"output": lambda r: r[0], "cell weight gradients": lambda r: concat(r[1], weights),
                 "α gradient": lambda r: r[1]["alpha"], "β gradient": lambda r: r[1]["beta"],
                 "running statistics": lambda r: concat(r[2], stats)}
        for what, get in pairs.items():
            floor = relative(get(ref16), get(ref32))        # what bf16 does to the reference itself
            assert relative(get(lean16), get(ref16)) <= 1.5 * floor + 1e-6, (where, ckpt, what)
            assert relative(get(lean32), get(ref32)) < 1e-5, (where, ckpt, what)
        assert all(torch.equal(lean16[2][n], ref16[2][n]) for n in lean16[2] if "num_batches" in n)


def test_cpu_conv_guard_only_where_the_kernel_is_broken():
    """The CPU stand-in for the GPU path (--amp on --channels_last on) runs without oneDNN only where torch's oneDNN
    kernel gives non-finite weight gradients for a bf16 channels_last dilated depthwise convolution (DilConv's);
    every other configuration is left alone."""
    from common.utils import dilated_depthwise_bf16_ok
    was = torch.backends.mkldnn.enabled
    assert was, "oneDNN should be on at the start of a test (conftest.keep_onednn_setting)"
    try:
        for device, amp, cl in ((torch.device("cpu"), True, False), (torch.device("cpu"), False, True),
                                (torch.device("cuda"), True, True)):
            said = []
            cpu_conv_guard(device, amp, cl, say=said.append)
            assert torch.backends.mkldnn.enabled == was and not said
        said, broken = [], not dilated_depthwise_bf16_ok()
        cpu_conv_guard(torch.device("cpu"), True, True, say=said.append)
        assert torch.backends.mkldnn.enabled == (was and not broken) and bool(said) == (was and broken)
        if said:
            assert "oneDNN" in said[0] and dilated_depthwise_bf16_ok()   # the native kernel is sound
    finally:
        torch.backends.mkldnn.enabled = was


@pytest.mark.parametrize("mode", ["lth", "full"])
def test_contract_float64_search_steps(mode):
    """The contract, train mode: the lean step (shared parameter-free ops, grouped convolutions, one merge per node)
    against common/iac.py's edge-by-edge step of Eq. (4) and (9), in float64 over several search steps with ops and a whole edge pruned
    between them, checkpointed and not, 2-D and 3-D: the same losses, every gradient of α, β and the cell
    weights, the updated weights and the BatchNorm running statistics."""
    for dims, ckpt in ((2, False), (2, True), (2, "cell"), (2, "fine"), (3, False)):
        size = (12, 12) if dims == 2 else (6, 6, 6)
        torch.manual_seed(0)
        plain = IACSearchSkips([8, 12], [16, 8], dims=dims).double()
        with torch.no_grad():
            plain.alpha.normal_()
            plain.beta.normal_()
        lean = LeanSearchSkips([8, 12], [16, 8], dims=dims, checkpoint_edges=ckpt).double()
        lean.load_state_dict(plain.state_dict())
        torch.manual_seed(1)
        batches = [[(torch.randn(3, cs, *size, dtype=torch.float64), torch.randn(3, cu, *size, dtype=torch.float64))
                    for cs, cu in ((8, 16), (12, 8))] for _ in range(3)]
        prunes = [[], [(0, 1), (0, 2), (4, 3), (4, 6), (7, 0)], [(1, o) for o in range(6)]]
        runs = []
        for s in (plain, lean):
            w_opt, a_opt = weight_optimizer(s, 0.05), arch_optimizer(s, 0.01, (0.5, 0.999), 1e-3)

            def loss_of(batch, s=s):
                s.prepare(None)
                return sum(s(level, *xs).square().mean() for level, xs in enumerate(batch))

            record = []
            for step, batch in enumerate(batches):
                for e, o in prunes[step]:
                    s.prune_op(e, o)
                if step == 2:
                    s.prune_edge(9)
                w_opt = weight_optimizer(s, 0.05)
                losses = search_step(mode, True, s, w_opt, a_opt, loss_of, batch, lambda b=batches[step - 1]: b)
                record.append((losses, {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}))
            runs.append((record, {n: t.clone() for n, t in s.state_dict().items()}))
        (rec_p, state_p), (rec_l, state_l) = runs
        for (loss_p, grad_p), (loss_l, grad_l) in zip(rec_p, rec_l):
            assert [v is None for v in loss_p] == [v is None for v in loss_l] == [False, mode == "lth"]
            assert [v for v in loss_l if v is not None] == pytest.approx([v for v in loss_p if v is not None],
                                                                         rel=1e-12, abs=1e-14)
            assert grad_p.keys() == grad_l.keys() and {"alpha", "beta"} <= set(grad_p)
            for n in grad_p:
                torch.testing.assert_close(grad_l[n], grad_p[n], rtol=1e-10, atol=1e-13, msg=f"{dims}-D {n}")
        assert state_p.keys() == state_l.keys()
        for n in state_p:                                  # weights after the updates, BN statistics, masks
            torch.testing.assert_close(state_l[n], state_p[n], rtol=1e-10, atol=1e-13, msg=f"{dims}-D {n}")


@pytest.mark.parametrize("lean", [True, False])
def test_checkpointed_edges_same_gradients_and_bn_statistics(lean):
    """--checkpoint_edges on (and cell, fine) recomputes the ops in backward: gradients (weights and α, β), the output
    and the BatchNorm running statistics equal those of the stored-activation supernet (one update per step)."""
    grads, stats = [], []
    for ckpt in (False, True, "cell", "fine"):
        torch.manual_seed(0)
        s = LeanSearchSkips([8, 16], [16, 32], checkpoint_edges=ckpt, lean=lean)
        s.prune_op(2, OPS.index("max_pool_3x3"))
        torch.manual_seed(1)
        x = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)]
        s.prepare(None)
        out = s(1, x[2], x[3]).square().mean() + s(0, x[0], x[1]).square().mean()
        out.backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters()})
        stats.append({n: b.clone() for n, b in s.named_buffers() if "running" in n})
    for other in (1, 2, 3):                                # edges checkpointed, the whole cell too, edge by edge
        assert grads[0].keys() == grads[other].keys() and stats[0].keys() == stats[other].keys()
        exact = 0 if other < 3 or not lean else 1e-6      # lean "fine" runs each edge's BN alone: another sum order
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[other][n], rtol=1e-5, atol=1e-7, msg=n)
        for n in stats[0]:
            torch.testing.assert_close(stats[0][n], stats[other][n], rtol=exact, atol=exact, msg=n)
    assert any(not torch.all(v == 0) for n, v in stats[1].items() if "running_mean" in n)   # they did update


def test_memory_estimate_counts_what_backward_keeps():
    """common/memory.py: the meta-device count (shapes only, used at batch 128 and 256x256) equals the same count on
    real CPU tensors; checkpointing keeps less at every level, the lean step less than the edge-by-edge one; the
    plan checkpoints nothing when the step fits, the levels that save most first, and says when nothing fits."""
    from common.backbones import UNet
    from common.memory import checkpoint_plan, search_memory, step_bytes
    torch.manual_seed(0)
    net = UNet("base", 1, 3, "ref", width=4)
    net.freeze_backbone()
    ests = {}
    for lean in (False, True):
        skips = LeanSearchSkips(net.skip_channels, net.up_channels, lean=lean)
        ests[lean] = search_memory(net, skips, 2, 1, (32, 32))
        cpu = search_memory(net, skips, 2, 1, (32, 32), device="cpu")
        assert cpu["levels"] == ests[lean]["levels"] and cpu["params"] == ests[lean]["params"]
        assert cpu["rest"] == pytest.approx(ests[lean]["rest"], rel=0.01)     # eval BN: (C,) stats on meta, () on CPU
        assert all(0 < lv["cell"] < lv["checkpointed"] < lv["stored"] / 2 for lv in ests[lean]["levels"])
        assert all(lv["fine"] == lv["cell"] and 0 < lv["fine_region"] <= lv["region"] for lv in ests[lean]["levels"])
        assert ests[lean]["rest"] > 0 and isinstance(skips.cells[0].checkpoint_edges, bool)   # skips untouched
    assert all(a["stored"] < b["stored"] for a, b in zip(ests[True]["levels"], ests[False]["levels"]))
    for a, b in zip(ests[True]["levels"], ests[False]["levels"]):     # lean, checkpointed: less kept and recomputed
        assert a["checkpointed"] < b["checkpointed"] and a["cell_region"] < b["cell_region"] and a["region"] > 0
        assert a["fine_region"] < a["region"] / 2 and b["fine_region"] == b["region"]   # one op of one edge at a time
    doubled = search_memory(net, skips, 4, 1, (32, 32), device="cpu")   # activations scale with the batch (the CPU
                                                                        # count equals the meta one, and is faster)
    assert doubled["levels"][0]["stored"] == pytest.approx(2 * ests[True]["levels"][0]["stored"], rel=0.01)
    est = ests[True]
    assert checkpoint_plan(est, 10 ** 12)[0] == [False] * 4
    plan, need, fits = checkpoint_plan(est, 0)
    assert plan == ["fine"] * 4 and not fits and need == step_bytes(est, plan)
    cells = step_bytes(est, ["cell"] * 4)                              # every whole cell, then level 0 edge by edge
    assert step_bytes(est, ["fine", "cell", "cell", "cell"]) < cells
    assert checkpoint_plan(est, cells)[0] == ["cell"] * 4
    assert checkpoint_plan(est, cells - 1)[0] == ["fine", "cell", "cell", "cell"]
    one = step_bytes(est, [True, False, False, False])                 # level 0 saves the most
    assert checkpoint_plan(est, one) == ([True, False, False, False], one, True)
    from common.memory import BUDGET_SHARE, choose_plan, plan_for_run   # the fixed settings, auto without a GPU
    every = step_bytes(est, [True] * 4)
    assert choose_plan("on", est, every) == ([True] * 4, every, True) and not choose_plan("on", est, every - 1)[2]
    assert choose_plan("auto", est)[0] == [False] * 4 and choose_plan("cell", est)[2]
    assert choose_plan("auto", est, one) == checkpoint_plan(est, one)
    gpu = torch.device("cuda")                                         # --checkpoint_edges auto on a GPU ...
    assert plan_for_run("auto", gpu, net, skips, 2, (32, 32), False, free=10 ** 12)[0] == [False] * 4
    plan, lines = plan_for_run("auto", gpu, net, skips, 2, (32, 32), False, free=one / BUDGET_SHARE)
    assert plan == [True, False, False, False] and "checkpointed" in lines[1]
    assert plan_for_run("auto", torch.device("cpu"), net, skips, 2, (32, 32), False) == ([False] * 4, [])   # ... CPU
    assert plan_for_run("on", torch.device("cpu"), net, skips, 2, (32, 32), False) == ([True] * 4, [])
    assert plan_for_run("cell", torch.device("cpu"), net, skips, 2, (32, 32), False) == (["cell"] * 4, [])
    assert plan_for_run("fine", torch.device("cpu"), net, skips, 2, (32, 32), False) == (["fine"] * 4, [])


def test_shared_statistics_under_autocast_equal_separate_batchnorms():
    """Under bf16 autocast the lean step's shared BatchNorm statistics (one pool's output for every edge leaving a
    node; one grouped convolution op for all of them) equal what each edge's own modules record on the same bf16
    input, in float32 buffers: the pools' up to summation order, the convolution ops' within bf16 rounding of
    the grouped convolutions."""
    from common.iac import make_op
    from common.lean_cell import _batched_conv_op, _shared_batch_norm
    torch.manual_seed(0)
    x = torch.randn(4, 6, 12, 12).to(torch.bfloat16)           # what a node's C/K channels are under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("avg_pool_3x3", "max_pool_3x3", "sep_conv_5x5", "dil_conv_3x3"):
            own = [make_op(name, 6, search=True) for _ in range(3)]
            shared = copy.deepcopy(own)
            outs = [m(x) for m in own]                          # each edge's op on its own
            if "pool" in name:
                got = [_shared_batch_norm(shared[0][0](x), [m[1] for m in shared])] * 3
                tol = dict(rtol=1e-5, atol=1e-7)
            else:
                got = _batched_conv_op(shared, F.relu(x))
                tol = dict(rtol=2e-2, atol=2e-3)
            for a, b, y, z in zip(own, shared, outs, got):
                assert y.dtype == z.dtype == torch.bfloat16
                for (n, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
                    if "running" in n:
                        assert u.dtype == v.dtype == torch.float32 and not torch.equal(v, torch.zeros_like(v))
                        torch.testing.assert_close(v, u, **tol, msg=f"{name} {n}")
                    else:
                        assert torch.equal(v, u), f"{name} {n}"          # num_batches_tracked
