"""IAC and IAC-LTH inside nnU-Net (nnU-Net v2 trainer plugin; paper Sec. 6.2, 6.5-6.7): the 2d configuration as
in the paper, and 3d_fullres / 3d_lowres with 3-D cells (the paper's first stated limitation).

Point nnU-Net at this folder and name a trainer:

    export nnUNet_extTrainer=/path/to/iac-lth/nnunet_iac
    nnUNetv2_train D 2d F -tr nnUNetTrainerIACRef                 # the 2-D reference
    nnUNetv2_train D 2d F -tr nnUNetTrainerIACSearchLTH           # -> genotype.json, theta0.pt, trajectory.jsonl
    IAC_GENOTYPE=$nnUNet_results/.../nnUNetTrainerIACSearchLTH__nnUNetPlans__2d/fold_F/genotype.json \\
        nnUNetv2_train D 2d F -tr nnUNetTrainerIACLTH
    IAC_GENOTYPE=(the same) nnUNetv2_predict -i IN -o OUT -d D -c 2d -f F -tr nnUNetTrainerIACLTH

Trainers (each also as a `...NoDA` variant without data augmentation, as nnUNetTrainerNoDA):
    nnUNetTrainerIACRef        nnU-Net's own trainer with settable lengths: the reference 2-D nnU-Net
    nnUNetTrainerIACSearchFull frozen reference + a supernet IAC on every skip, `full` search as in 03_search.py
    nnUNetTrainerIACSearchLTH  the same with `lth` search (common/lean_cell.py, common/lth.py, common/search.py);
                               both write genotype.json, theta0.pt, trajectory.jsonl into their fold folder
    nnUNetTrainerIAC           frozen reference + the discrete cell of IAC_GENOTYPE on every skip, deep
                               supervision, nnU-Net's loss and optimiser; only the cells train; fresh init
    nnUNetTrainerIACLTH        the same, cell reset to θ0 of the search (IAC-LTH)

Settings (environment variables, so tests and demos can run tiny):
    IAC_EPOCHS, IAC_ITERS, IAC_VAL_ITERS    epochs (search trainers: 200, the paper's; others: nnU-Net's),
                   training / validation iterations per epoch
    IAC_FINAL_VALIDATION=0   skip nnU-Net's final validation of the fold (tests, demos)
    IAC_AMP        search trainers: bf16 autocast auto (on with CUDA), on (also on the CPU: the GPU's dtype path) or off
    IAC_STOP_AFTER=N   search trainers: leave after N epochs (job time limits); `nnUNetv2_train ... --c` continues
                   from the search's checkpoint_latest.pth (pruned ops stay pruned, θ0 is kept)
    IAC_BACKBONE   checkpoint of the finished reference; default: checkpoint_final.pth of the same fold
                   of nnUNetTrainerIACRef (or ...RefNoDA for the NoDA trainers), same plans and configuration
    IAC_GENOTYPE   genotype.json (nnUNetTrainerIAC / IACLTH, training and nnUNetv2_predict)
    IAC_THETA0     theta0.pt for nnUNetTrainerIACLTH (default: beside the genotype)
    IAC_<SETTING>  every search setting of 03_search.py, from the one table in common/search.py:
                   IAC_WARMUP, IAC_TAU0_REL (κ) or IAC_TAU0 (absolute), IAC_GAMMA, IAC_K_STD, IAC_JS_SUPPORT,
                   IAC_EDGE_RULE, IAC_PC_K, IAC_LR_W, IAC_LR_ARCH, IAC_ARCH_BETAS=0.5,0.999, ...

Every trainer works in 2d, 3d_fullres and 3d_lowres: the cells take the encoder's dimensionality (3-D cells are
checkpointed per edge on CUDA, IAC_CHECKPOINT_EDGES; benchmarks/bench_3d.py measures their memory per level).

The cell sits where the decoder joins the transposed-conv output `up` with the encoder skip:
cat(up, cell(skip, up)); its output keeps the skip's channel count, so the frozen decoder is unchanged.
In `full` mode the fold's training cases are split once (seeded) into train_search / val_search halves,
as stage II does; α, β step on val_search batches (nnU-Net's validation loader: no augmentation).
In `lth` mode the search trains on all of the fold's training cases.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

try:
    from common.checkpoints import load_theta0_into, resume_search, save_checkpoint, save_theta0, search_checkpoint
except ImportError as e:
    raise ImportError("the IAC-LTH project is not installed in this environment: run `pip install -e "
                      "/path/to/iac-lth` (the folder above nnunet_iac/) and try again") from e
from common.iac import IACSkips, init_from_theta0, make_theta0, read_genotype, write_genotype
from common.lean_cell import LeanSearchSkips
from common.lth import all_edges_single
from common.search import (arch_optimizer, checkpoint_edges, cosine_power_lr, end_of_epoch, keep_top2_edges, lth_state,
                           search_step, search_summary, settings_from_env, trajectory_record, weight_optimizer)
from common.utils import SWITCH, JsonlLog, autocast, switch_on


def _env(name, default=None, cast=str):
    v = os.environ.get(name)
    return default if v in (None, "") else cast(v)


def reference_checkpoint(trainer):
    """IAC_BACKBONE, or checkpoint_final.pth of this fold of the matching reference trainer."""
    if _env("IAC_BACKBONE"):
        return _require_env("IAC_BACKBONE", "the checkpoint of the finished 2-D reference")
    ref = "nnUNetTrainerIACRefNoDA" if type(trainer).__name__.endswith("NoDA") else "nnUNetTrainerIACRef"
    path = os.path.join(os.environ["nnUNet_results"], trainer.plans_manager.dataset_name,
                        f"{ref}__{trainer.plans_manager.plans_name}__{trainer.configuration_name}",
                        f"fold_{trainer.fold}", "checkpoint_final.pth")
    if not os.path.isfile(path):
        raise RuntimeError(f"no reference checkpoint {path}: train it first (nnUNetv2_train ... -tr {ref}) "
                           "or set IAC_BACKBONE")
    return path


def _require_env(name, what):
    v = _env(name)
    if not v:
        raise RuntimeError(f"{name} is not set: {what}")
    if not os.path.isfile(v):
        raise RuntimeError(f"{name}={v} does not exist: {what}")
    return v


class IACUNet(nn.Module):
    """A frozen nnU-Net PlainConvUNet with a skip module at every decoder join.

    `skips(level, skip, up)` with level 0 = highest resolution; deep supervision is whatever
    `self.decoder.deep_supervision` says, as nnU-Net sets it."""

    def __init__(self, net, skips):
        super().__init__()
        self.net, self.skips = net, skips
        self.backbone_frozen = False

    @property
    def decoder(self):                       # nnU-Net sets decoder.deep_supervision through this
        return self.net.decoder

    @property
    def skip_channels(self):
        return list(self.net.encoder.output_channels[:-1])

    def freeze_backbone(self):
        self.net.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.backbone_frozen:
            self.net.eval()                  # frozen normalisation statistics
        return self

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            feats = self.net.encoder(x)
        dec = self.net.decoder
        lres, outs, n = feats[-1], [], len(dec.stages)
        for s in range(n):
            up = dec.transpconvs[s](lres)
            level = n - 1 - s                                            # feats[-(s+2)]
            x = dec.stages[s](torch.cat((up, self.skips(level, feats[level], up)), 1))
            if dec.deep_supervision:
                outs.append(dec.seg_layers[s](x))
            elif s == n - 1:
                outs.append(dec.seg_layers[-1](x))
            lres = x
        outs = outs[::-1]
        return outs if dec.deep_supervision else outs[0]


def net_dims(net):
    """2 for nnU-Net's 2d configuration, 3 for 3d_fullres / 3d_lowres: the cells take the encoder's dimensionality."""
    return 3 if net.encoder.conv_op is nn.Conv3d else 2


def load_nnunet_checkpoint(path):
    """torch.load(weights_only=True) of an nnU-Net checkpoint: its logs hold numpy scalars, allow just those."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in
                                                    ("float64", "float32", "float16", "int64", "int32", "bool")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def unwrap(network):
    """The IACUNet behind a torch.compile wrapper, if any."""
    return getattr(network, "_orig_mod", network)


def load_reference(trainer, path):
    """Load the finished reference nnU-Net into trainer.network.net, checking it fits these plans."""
    try:
        ck = load_nnunet_checkpoint(path)
    except Exception as e:  # corrupt file or not a checkpoint
        raise RuntimeError(f"IAC_BACKBONE={path} cannot be read as an nnU-Net checkpoint ({e})") from e
    init = ck.get("init_args", {}) if isinstance(ck, dict) else {}
    if "network_weights" not in ck or init.get("configuration") != trainer.configuration_name:
        raise RuntimeError(f"IAC_BACKBONE={path} is not a {trainer.configuration_name} nnU-Net checkpoint "
                           f"(found configuration {init.get('configuration')!r}); train this configuration's "
                           "reference first")
    plans_name = init.get("plans", {}).get("plans_name")
    if plans_name != trainer.plans_manager.plans_name:
        raise RuntimeError(f"IAC_BACKBONE={path} was trained with plans {plans_name!r}, this run uses "
                           f"{trainer.plans_manager.plans_name!r}")
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in ck["network_weights"].items()}
    try:
        unwrap(trainer.network).net.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"IAC_BACKBONE={path} does not fit the network of these plans: {e}") from e
    unwrap(trainer.network).freeze_backbone()


class nnUNetTrainerIACRef(nnUNetTrainer):
    """nnU-Net's trainer with epochs and iterations from IAC_EPOCHS / IAC_ITERS / IAC_VAL_ITERS."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        for var in ("nnUNet_preprocessed", "nnUNet_results"):     # before nnU-Net fails less clearly
            if not os.environ.get(var):
                raise RuntimeError(f"{var} is not set; export it as the nnU-Net documentation describes")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _env("IAC_EPOCHS", self.num_epochs, int)
        self.num_iterations_per_epoch = _env("IAC_ITERS", self.num_iterations_per_epoch, int)
        self.num_val_iterations_per_epoch = _env("IAC_VAL_ITERS", self.num_val_iterations_per_epoch, int)

    def perform_actual_validation(self, save_probabilities=False):
        if _env("IAC_FINAL_VALIDATION", "1") == "0":           # tests and demos: skip the sliding-window pass
            self.print_to_log_file("final validation skipped (IAC_FINAL_VALIDATION=0)")
            return
        super().perform_actual_validation(save_probabilities)


class nnUNetTrainerIAC(nnUNetTrainerIACRef):
    """Stage III in nnU-Net: the discrete cell of IAC_GENOTYPE on every skip of the frozen reference."""
    theta0_init = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        path = _require_env("IAC_GENOTYPE", "give the genotype.json this model is (or was) trained with")
        g = read_genotype(path)
        skip_ch = list(net.encoder.output_channels[:-1])
        geo = g.get("search", {}).get("geometry", {})
        if geo and list(geo.get("skip_channels", skip_ch)) != skip_ch:
            raise RuntimeError(f"IAC_GENOTYPE={path} was searched on skips with channels {geo['skip_channels']}; "
                               f"these plans give {skip_ch}. Search again on this configuration.")
        return IACUNet(net, IACSkips(g, skip_ch, skip_ch, geo.get("cell_channels"), dims=net_dims(net)))

    def configure_optimizers(self):
        params = unwrap(self.network).skips.parameters()  # only the cells train
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_train_start(self):
        super().on_train_start()
        load_reference(self, reference_checkpoint(self))
        if self.current_epoch == 0:
            g_path = _env("IAC_GENOTYPE")
            init = "theta0" if self.theta0_init else "fresh"
            if self.theta0_init:                          # IAC-LTH: reset the found cell to θ0
                t_path = _env("IAC_THETA0", os.path.join(os.path.dirname(g_path), "theta0.pt"))
                load_theta0_into(unwrap(self.network).skips, t_path, flag="IAC_THETA0")
            self.print_to_log_file(f"IAC cell: {g_path}, init {init}")


class nnUNetTrainerIACLTH(nnUNetTrainerIAC):
    """IAC-LTH: the cell starts from θ0, the weights it had at the start of the search."""
    theta0_init = True


def search_settings():
    """The search settings from IAC_* (common/search.py), with a clear error for a bad value."""
    try:
        return settings_from_env()
    except ValueError as e:
        raise RuntimeError(str(e)) from None


def search_halves(keys, seed=12345, patients=None):
    """Stage II's train_search / val_search: the fold's training cases in two seeded halves, by patient (as
    01_preprocess.py splits), so that two cases of one patient (ACDC's ED and ES frames) never sit in both
    halves. `patients`: case -> patient (dataset.json's "patients", written by scripts/convert_to_nnunet.py);
    without it a case is its own patient."""
    patients = patients or {}
    keys = sorted(keys)
    groups = sorted({patients.get(k, k) for k in keys})
    if len(groups) < 2:
        raise RuntimeError(f"a full (bilevel) search needs at least 2 training patients in the fold, found "
                           f"{len(groups)}")
    perm = np.random.RandomState(seed).permutation(len(groups))
    half = len(groups) // 2
    val = {groups[i] for i in perm[:half]}
    return [k for k in keys if patients.get(k, k) not in val], [k for k in keys if patients.get(k, k) in val]


def search_amp(device):
    """IAC_AMP: auto (bf16 autocast with CUDA), on (also on the CPU: the GPU's dtype path, as 03's --amp on), off."""
    amp = _env("IAC_AMP", "auto")
    if amp not in SWITCH:
        raise RuntimeError(f"IAC_AMP={amp!r}: use one of {', '.join(SWITCH)}")
    return switch_on(amp, device)


class nnUNetTrainerIACSearchLTH(nnUNetTrainerIACRef):
    """Stage II in nnU-Net: search one genotype for every skip of the frozen reference (`lth`)."""
    search_mode = "lth"

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.search = search_settings()
        self.num_epochs = self.search.epochs              # IAC_EPOCHS, default the paper's 200

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        skip_ch = list(net.encoder.output_channels[:-1])
        s = search_settings()
        gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")     # (auto: on where nnU-Net takes CUDA)
        return IACUNet(net, LeanSearchSkips(skip_ch, skip_ch, None, s.pc_k, s.beta_fn, dims=net_dims(net),
                                            output=s.cell_output, lean=s.lean_step == "on",
                                            checkpoint_edges=checkpoint_edges(s.checkpoint_edges, gpu)))

    def _do_i_compile(self):
        return False                          # pruning changes the graph; no torch.compile for the search

    def perform_actual_validation(self, save_probabilities=False):
        self.print_to_log_file("search run: no validation of the supernet; train the cell with nnUNetTrainerIAC")

    def load_checkpoint(self, filename_or_checkpoint):
        """nnUNetv2_train --c hands over checkpoint_latest.pth (the search's own, written after every epoch) or,
        once the search has ended, checkpoint_final.pth: run_training continues from the first and leaves the
        second alone."""
        self.continue_from = filename_or_checkpoint

    def _finish_loaders(self):
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()

    def run_training(self):
        s, mode = self.search, self.search_mode
        out = self.output_folder
        cont = getattr(self, "continue_from", None)
        if cont and os.path.isfile(os.path.join(out, "genotype.json")):
            self.print_to_log_file("the search has ended (genotype.json): nothing to continue")
            return
        self.on_train_start()
        self.amp = search_amp(self.device)
        self.print_to_log_file(f"IAC search [{mode}]: bf16 autocast {'on' if self.amp else 'off'} (IAC_AMP), "
                               f"checkpointed per level: {[c.checkpoint_edges for c in self.network.skips.cells]}")
        backbone = reference_checkpoint(self)
        load_reference(self, backbone)
        skips = self.network.skips
        skip_ch = self.network.skip_channels          # (no torch.compile here: see _do_i_compile)
        geometry = {"skip_channels": skip_ch, "up_channels": skip_ch, "cell_channels": None}
        dims = net_dims(self.network.net)
        w_opt = weight_optimizer(skips, s.lr_w)
        a_opt = arch_optimizer(skips, s.lr_arch, s.arch_betas, s.arch_weight_decay)
        lth = lth_state(s)
        run_args = argparse.Namespace(**vars(s), mode=mode)            # what resume_search compares
        latest = os.path.join(out, "checkpoint_latest.pth")
        seconds, stopped, start_epoch = 0.0, False, 0
        if cont:                                                       # --c: pruned ops stay pruned, θ0 stays
            start_epoch, seconds, _ = resume_search(cont, skips, a_opt, lth, run_args, geometry, self.device)
            w_opt = weight_optimizer(skips, s.lr_w)
            self.print_to_log_file(f"continuing the search at epoch {start_epoch + 1}; "
                                   f"{int(skips.op_mask.sum())} ops active")
        else:
            theta0 = make_theta0(**geometry, dims=dims)
            init_from_theta0(skips, theta0)
            save_theta0(os.path.join(out, "theta0.pt"), theta0, geometry, "nnU-Net PlainConvUNet")
        traj = JsonlLog(os.path.join(out, "trajectory.jsonl"), start_epoch - 1 if cont else None)
        stop_after = _env("IAC_STOP_AFTER", 0, int)
        epoch = start_epoch - 1
        if cont and mode == "lth" and all_edges_single(skips.op_mask):   # killed after its stop epoch: derive
            stopped = True                                             # from that checkpoint, no further epoch
        for epoch in range(start_epoch, self.num_epochs if not stopped else start_epoch):
            t0 = time.time()
            lr = cosine_power_lr(epoch, self.num_epochs, s.lr_w, s.lr_w_min, s.lr_power)
            for g in w_opt.param_groups:
                g["lr"] = lr
            self.network.train()
            total = 0.0
            for _ in range(self.num_iterations_per_epoch):
                value, _ = search_step(mode, epoch >= s.warmup, skips, w_opt, a_opt, self._batch_loss,
                                       next(self.dataloader_train), lambda: next(self.dataloader_val))
                total += value
            info = end_of_epoch(skips, lth, mode, epoch, s.warmup)
            if info["pruned"]:
                w_opt = weight_optimizer(skips, lr)
            epoch_s = time.time() - t0
            seconds += epoch_s
            losses = {"train_loss": total / max(self.num_iterations_per_epoch, 1)}
            traj.write(trajectory_record(skips, info, epoch, losses, lr, epoch_s, lth if mode == "lth" else None))
            self.print_to_log_file(f"IAC search [{mode}] epoch {epoch + 1}/{self.num_epochs} loss "
                                   f"{losses['train_loss']:.4f} active ops {int(skips.op_mask.sum())} "
                                   f"pruned {len(info['pruned'])} {epoch_s:.1f}s")
            save_checkpoint(search_checkpoint(skips, a_opt, lth, epoch, seconds, run_args, geometry), latest)
            if info["stopped"]:
                stopped = True
                break
            if stop_after and epoch + 1 - start_epoch >= stop_after and epoch + 1 < self.num_epochs:
                self.print_to_log_file(f"stopping after {stop_after} epochs (IAC_STOP_AFTER); continue with "
                                       "nnUNetv2_train ... --c")
                self._finish_loaders()
                return
        if stopped:
            keep_top2_edges(skips, s.edge_rule)
        genotype = skips.derive_genotype(s.edge_rule)
        write_genotype(os.path.join(out, "genotype.json"), genotype,
                       search_summary(mode, s, lth, epoch + 1, stopped, seconds, backbone=backbone,
                                      encoder=f"nnunet_{dims}d", dataset=self.plans_manager.dataset_name, seed=None,
                                      geometry=geometry))
        self.print_to_log_file(f"genotype: {genotype['edges']}")
        self.on_train_end()

    def _batch_loss(self, batch):
        """nnU-Net's loss (deep supervision included) on one batch; bf16 autocast as IAC_AMP says (search_amp)."""
        t = batch["target"]
        target = [i.to(self.device) for i in t] if isinstance(t, list) else t.to(self.device)
        with autocast(self.device, self.amp):
            return self.loss(self.network(batch["data"].to(self.device)), target)


class nnUNetTrainerIACSearchFull(nnUNetTrainerIACSearchLTH):
    """The original bilevel search (`full`): w on train_search batches, α, β on val_search batches."""
    search_mode = "full"

    def do_split(self):
        """The fold's training cases in train_search / val_search halves (its validation cases stay out)."""
        tr_keys, _ = super().do_split()
        train_search, val_search = search_halves(tr_keys, patients=self.dataset_json.get("patients"))
        self.print_to_log_file(f"full search: {len(train_search)} train_search, {len(val_search)} val_search cases")
        return train_search, val_search


class nnUNetTrainerIACRefNoDA(nnUNetTrainerIACRef, nnUNetTrainerNoDA):
    pass


class nnUNetTrainerIACSearchLTHNoDA(nnUNetTrainerIACSearchLTH, nnUNetTrainerNoDA):
    pass


class nnUNetTrainerIACSearchFullNoDA(nnUNetTrainerIACSearchFull, nnUNetTrainerNoDA):
    pass


class nnUNetTrainerIACNoDA(nnUNetTrainerIAC, nnUNetTrainerNoDA):
    pass


class nnUNetTrainerIACLTHNoDA(nnUNetTrainerIACLTH, nnUNetTrainerNoDA):
    pass
