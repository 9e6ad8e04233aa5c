"""IAC and IAC-LTH inside nnU-Net (nnU-Net v2 trainer plugin; paper Sec. 6.2, 6.5-6.7): cells implanted into the skips
of a trained, frozen nnU-Net model: any nnU-Net v2 trainer's checkpoint of a PlainConvUNet (nnU-Net's default plans)
or a ResidualEncoderUNet (the ResEnc M / L / XL presets), in 2d as in the paper, and in 3d_fullres / 3d_lowres with
3-D cells (the paper's first stated limitation). docs/nnunet.md says how.

Point nnU-Net at this folder, give the model (IAC_BACKBONE) and the plans it was trained with (-p), name a trainer:

    export nnUNet_extTrainer=/path/to/iac-lth/nnunet_iac
    IAC_BACKBONE=$nnUNet_results/.../nnUNetTrainer__PLANS__2d/fold_F/checkpoint_final.pth \\
        nnUNetv2_train D 2d F -tr nnUNetTrainerIACSearchLTH -p PLANS   # -> genotype.json, theta0.pt, trajectory.jsonl
    IAC_GENOTYPE=$nnUNet_results/.../nnUNetTrainerIACSearchLTH__PLANS__2d/fold_F/genotype.json \\
        nnUNetv2_train D 2d F -tr nnUNetTrainerIACLTH -p PLANS         # in the backbone the genotype names
    IAC_GENOTYPE=(the same) nnUNetv2_predict -i IN -o OUT -d D -c 2d -f F -tr nnUNetTrainerIACLTH -p PLANS

Trainers (each also as a `...NoDA` variant without data augmentation, as nnUNetTrainerNoDA):
    nnUNetTrainerIACRef        nnU-Net's own trainer with settable lengths, IAC_BATCH, IAC_SEED and stop signals:
                               the default backbone when IAC_BACKBONE is not set
    nnUNetTrainerIACSearchFull frozen backbone + a supernet IAC on every skip, `full` search as in 03_search.py
    nnUNetTrainerIACSearchLTH  the same with `lth` search (common/lean_cell.py, common/lth.py, common/search.py);
                               both write genotype.json (with the backbone's path, weights hash, trainer, network,
                               plans, configuration), theta0.pt, trajectory.jsonl into their fold folder
    nnUNetTrainerIAC           frozen backbone + the discrete cell of IAC_GENOTYPE on every skip, deep
                               supervision, nnU-Net's loss and optimiser; only the cells train; fresh init;
                               writes iac_cell.json (genotype, init, θ0, backbone and how it was chosen)
    nnUNetTrainerIACLTH        the same, cell reset to θ0 of the search (IAC-LTH)

Settings (environment variables, so tests and demos can run tiny):
    IAC_EPOCHS, IAC_ITERS, IAC_VAL_ITERS    epochs (search trainers: 200, the paper's; others: nnU-Net's),
                   training / validation iterations per epoch
    IAC_FINAL_VALIDATION=0   skip nnU-Net's final validation of the fold (tests, demos)
    IAC_AMP        search trainers: bf16 autocast auto (on with CUDA), on (also on the CPU: the GPU's dtype path) or off
    IAC_STOP_AFTER=N   search trainers: leave after N epochs (job time limits); `nnUNetv2_train ... --c` continues
                   from the search's checkpoint_latest.pth (pruned ops stay pruned, θ0 is kept)
    IAC_BACKBONE   the trained nnU-Net model (checkpoint_final.pth of any trainer; its plans and configuration
                   must be this run's -p and -c). Default: for a cell, the backbone its genotype was searched on;
                   else checkpoint_final.pth of this fold of nnUNetTrainerIACRef (...RefNoDA for the NoDA trainers)
    IAC_ALLOW_OTHER_BACKBONE=1   train a cell in a backbone with other weights than its genotype's (a transfer,
                   recorded in iac_cell.json); refused otherwise, naming both
    IAC_BATCH      the batch of every trainer here (default: the plans'; on the CPU a plans batch above 16 is
                   noted in the log)
    IAC_SAVE_EVERY checkpoint_latest.pth every N epochs (nnU-Net's 50; the search trainers: every epoch)
    IAC_SEED       seeds random, numpy and torch before the network is made
    OMP_NUM_THREADS  torch threads on the CPU (default: the cores this process may run on, where
                   nnUNetv2_train -device cpu takes every core of the machine)
    IAC_GENOTYPE   genotype.json (nnUNetTrainerIAC / IACLTH, training and nnUNetv2_predict)
    IAC_THETA0     theta0.pt for nnUNetTrainerIACLTH (default: beside the genotype)
    IAC_<SETTING>  every search setting of 03_search.py, from the one table in common/search.py:
                   IAC_WARMUP, IAC_TAU0_REL (κ) or IAC_TAU0 (absolute), IAC_GAMMA, IAC_K_STD, IAC_JS_SUPPORT,
                   IAC_EDGE_RULE, IAC_PC_K, IAC_LR_W, IAC_LR_ARCH, IAC_ARCH_BETAS=0.5,0.999, ...

Every trainer works in 2d, 3d_fullres and 3d_lowres: the cells take the encoder's dimensionality (3-D cells are
checkpointed per edge on CUDA, IAC_CHECKPOINT_EDGES; benchmarks/bench_3d.py measures their memory per level).
Backbone, genotype and θ0 are read and checked when a trainer is made, before nnU-Net starts its data-loader
workers, so a wrong one is the last line printed. A stop signal (USR1, USR2, TERM; common/runs.py) ends a run after
the step in progress: the data loaders are shut and it exits with 75; `nnUNetv2_train ... --c` continues.

The cell sits where the decoder joins the transposed-conv output `up` with the encoder skip:
cat(up, cell(skip, up)); its output keeps the skip's channel count, so the frozen decoder is unchanged.
In `full` mode the fold's training cases are split once (seeded) into train_search / val_search halves,
as stage II does; α, β step on val_search batches (nnU-Net's validation loader: no augmentation).
In `lth` mode the search trains on all of the fold's training cases.
"""
import argparse
import os
import random
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

try:
    from common.checkpoints import (load_theta0_into, nnunet_network_class, resume_search, save_checkpoint,
                                    save_theta0, search_checkpoint, weights_hash)
except ImportError as e:
    raise ImportError("the IAC-LTH project is not installed in this environment: run `pip install -e "
                      "/path/to/iac-lth` (the folder above nnunet_iac/) and try again") from e
from common.iac import GenotypeError, IACSkips, init_from_theta0, make_theta0, read_genotype, write_genotype
from common.lean_cell import LeanSearchSkips
from common.lth import all_edges_single
from common.runs import (REQUEUE_EXIT, Preempted, check_stop, ignore_stop_signals_at_exit, install_stop_signals,
                         mark_done)
from common.search import (arch_optimizer, checkpoint_edges, cosine_power_lr, end_of_epoch, keep_top2_edges, lth_state,
                           search_step, search_summary, settings_from_env, trajectory_record, weight_optimizer)
from common.utils import SWITCH, JsonlLog, atomic_write_json, autocast, switch_on


def _env(name, default=None, cast=str):
    v = os.environ.get(name)
    return default if v in (None, "") else cast(v)


SUPPORTED_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")     # nnU-Net's default and ResEnc M/L/XL plans


def reference_checkpoint(trainer):
    """The default backbone: checkpoint_final.pth of this fold of nnUNetTrainerIACRef (...RefNoDA for the NoDA
    trainers), same plans and configuration."""
    ref = "nnUNetTrainerIACRefNoDA" if type(trainer).__name__.endswith("NoDA") else "nnUNetTrainerIACRef"
    return os.path.join(os.environ["nnUNet_results"], trainer.plans_manager.dataset_name,
                        f"{ref}__{trainer.plans_manager.plans_name}__{trainer.configuration_name}",
                        f"fold_{trainer.fold}", "checkpoint_final.pth"), ref


def cpu_threads():
    """Torch threads on the CPU: OMP_NUM_THREADS when set, else the cores this process may run on (a SLURM or
    taskset allocation). nnUNetv2_train -device cpu sets multiprocessing.cpu_count(), every core of the machine,
    and torch threads that outnumber the free cores make each step many times slower."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _require_env(name, what):
    v = _env(name)
    if not v:
        raise RuntimeError(f"{name} is not set: {what}")
    if not os.path.isfile(v):
        raise RuntimeError(f"{name}={v} does not exist: {what}")
    return v


class IACUNet(nn.Module):
    """A frozen nnU-Net U-Net (PlainConvUNet, or ResidualEncoderUNet of the ResEnc plans: both have nnU-Net's
    UNetDecoder) with a skip module at every decoder join.

    `skips(level, skip, up)` with level 0 = highest resolution; deep supervision is whatever
    `self.decoder.deep_supervision` says, as nnU-Net sets it."""

    def __init__(self, net, skips):
        super().__init__()
        if type(net).__name__ not in SUPPORTED_NETWORKS:
            raise RuntimeError(f"the plans build a {type(net).__name__}; IAC cells go into nnU-Net's "
                               f"{' and '.join(SUPPORTED_NETWORKS)} (default and ResEnc plans)")
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
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in
                                                    ("float64", "float32", "float16", "int64", "int32", "bool")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def unwrap(network):
    """The IACUNet behind a torch.compile wrapper, if any."""
    return getattr(network, "_orig_mod", network)


def preprocessing_differences(theirs, mine, configuration, their_dataset, my_dataset):
    """What differs between the preprocessing and labels a checkpoint was trained with (its init_args' plans and
    dataset.json) and this run's, in words; [] when nothing that changes what the network sees or predicts: the
    configuration's spacing, normalisation, transposition and architecture, the CT intensity statistics, the labels.
    (Two data sets planned alike give one plans name, nnUNetPlans, for different fingerprints.)"""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    try:
        a, b = (PlansManager(p).get_configuration(configuration).configuration for p in (theirs, mine))
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return [f"the checkpoint's plans have no configuration {configuration}"]
    out = [f"{key} {a.get(key)} vs {b.get(key)}" for key in ("spacing", "normalization_schemes", "use_mask_for_norm")
           if a.get(key) != b.get(key)]
    out += [f"{key} differs" for key, x, y in (("transpose_forward", theirs, mine), ("architecture", a, b))
            if x.get(key) != y.get(key)]
    if "CTNormalization" in (b.get("normalization_schemes") or []) and \
            theirs.get("foreground_intensity_properties_per_channel") != \
            mine.get("foreground_intensity_properties_per_channel"):
        out.append("CT intensity statistics differ (another fingerprint)")
    if their_dataset.get("labels") is not None and their_dataset.get("labels") != my_dataset.get("labels"):
        out.append(f"labels {their_dataset.get('labels')} vs {my_dataset.get('labels')}")
    return out


class Backbone:
    """A trained nnU-Net model used as the frozen backbone: any nnU-Net v2 trainer's checkpoint (stock
    nnUNetTrainer, nnUNetTrainerIACRef, ...) of a PlainConvUNet or ResidualEncoderUNet, checked against the
    trainer's configuration and plans when it is read (before nnU-Net starts its data-loader workers), and named
    by its path and the sha256 of its weights (common/checkpoints.weights_hash)."""

    def __init__(self, path, trainer, how):
        try:
            ck = load_nnunet_checkpoint(path)
        except Exception as e:  # corrupt file or not a checkpoint
            raise RuntimeError(f"backbone {path} ({how}) cannot be read as an nnU-Net checkpoint ({e})") from e
        init = ck.get("init_args", {}) if isinstance(ck, dict) else {}
        if "network_weights" not in ck or init.get("configuration") != trainer.configuration_name:
            raise RuntimeError(f"backbone {path} ({how}) is not a {trainer.configuration_name} nnU-Net checkpoint "
                               f"(found configuration {init.get('configuration')!r}); give this configuration's "
                               "model")
        plans = init.get("plans", {})
        if plans.get("plans_name") != trainer.plans_manager.plans_name:
            raise RuntimeError(f"backbone {path} ({how}) was trained with plans {plans.get('plans_name')!r}, this run "
                               f"uses {trainer.plans_manager.plans_name!r}: give `-p {plans.get('plans_name')}` "
                               "(the plans the model was trained with)")
        diffs = preprocessing_differences(plans, trainer.plans_manager.plans, trainer.configuration_name,
                                          init.get("dataset_json", {}), trainer.dataset_json)
        if diffs and _env("IAC_ALLOW_OTHER_PLANS", "0") != "1":
            raise RuntimeError(f"backbone {path} ({how}) was trained on other data than this run's "
                               f"{trainer.plans_manager.dataset_name} / {trainer.plans_manager.plans_name}: "
                               f"{'; '.join(diffs)}. Its weights would load, but see inputs or labels they were not "
                               "trained on: search on the data set the model was trained on (or move its plans to "
                               "this one, nnUNetv2_move_plans_between_datasets, and preprocess again); "
                               "IAC_ALLOW_OTHER_PLANS=1 takes it as it is")
        self.path, self.how = os.path.abspath(path), how + ("; other preprocessing, IAC_ALLOW_OTHER_PLANS=1" if diffs
                                                            else "")
        self.state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v
                      for k, v in ck["network_weights"].items()}
        self.sha256 = weights_hash(self.state)
        self.trainer_name = ck.get("trainer_name", "?")
        self.network = nnunet_network_class(plans, trainer.configuration_name)

    def info(self):
        """What genotype.json, theta0.pt and the cell's iac_cell.json record of it."""
        return {"backbone": self.path, "backbone_sha256": self.sha256, "backbone_trainer": self.trainer_name,
                "network": self.network}

    def __str__(self):
        return f"{self.path} ({self.how}; {self.trainer_name}, {self.network}, weights sha256 {self.sha256})"


def find_backbone(trainer, genotype=None):
    """The backbone of a search or cell trainer: IAC_BACKBONE when set; else, for a cell, the backbone its genotype
    was searched on; else this fold's nnUNetTrainerIACRef checkpoint. A cell whose backbone is not the one its
    genotype was searched on (another file's weights) is refused, unless IAC_ALLOW_OTHER_BACKBONE=1 (a deliberate
    transfer, recorded in the run)."""
    searched = (genotype or {}).get("search", {})
    if _env("IAC_BACKBONE"):
        path, how = _require_env("IAC_BACKBONE", "the checkpoint of a trained nnU-Net model"), "IAC_BACKBONE"
    elif searched.get("backbone") and os.path.isfile(searched["backbone"]):
        path, how = searched["backbone"], "the backbone the genotype was searched on"
    else:
        path, ref = reference_checkpoint(trainer)
        how = f"this fold's {ref}"
        if not os.path.isfile(path):
            raise RuntimeError(f"no backbone: IAC_BACKBONE is not set"
                               + (f", the genotype's backbone {searched['backbone']} is not there"
                                  if searched.get("backbone") else "")
                               + f" and there is no {path}: set IAC_BACKBONE to your trained model's "
                                 f"checkpoint_final.pth, or train the reference (nnUNetv2_train ... -tr {ref})")
    bb = Backbone(path, trainer, how)
    want = searched.get("backbone_sha256")
    if genotype is not None and want and want != bb.sha256:
        if _env("IAC_ALLOW_OTHER_BACKBONE", "0") != "1":
            raise RuntimeError(f"the cell of IAC_GENOTYPE was searched on {searched.get('backbone')} (weights sha256 "
                               f"{want}), this run would train it in {bb.path} (sha256 {bb.sha256}): a cell is "
                               "trained in the backbone it was searched in. Point IAC_BACKBONE at that model, or "
                               "set IAC_ALLOW_OTHER_BACKBONE=1 for a deliberate transfer (recorded in the run)")
        bb.how += f"; transferred: searched on {searched.get('backbone')} (sha256 {want}), IAC_ALLOW_OTHER_BACKBONE=1"
    elif genotype is not None and not want:
        bb.how += "; the genotype records no backbone hash (an older search): not checked"
    return bb


def load_reference(trainer, backbone):
    """The backbone's weights into trainer.network.net, frozen."""
    try:
        unwrap(trainer.network).net.load_state_dict(backbone.state)
    except RuntimeError as e:
        raise RuntimeError(f"backbone {backbone.path} does not fit the network of these plans: {e}") from e
    unwrap(trainer.network).freeze_backbone()


class nnUNetTrainerIACRef(nnUNetTrainer):
    """nnU-Net's trainer with epochs and iterations from IAC_EPOCHS / IAC_ITERS / IAC_VAL_ITERS, a batch from
    IAC_BATCH, checkpoint_latest every IAC_SAVE_EVERY epochs, seeded by IAC_SEED, and a clean stop on a
    scheduler's signal (USR1 / USR2 / TERM: exit 75 after the step in progress; `--c` continues from the last
    saved epoch)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        for var in ("nnUNet_preprocessed", "nnUNet_results"):     # before nnU-Net fails less clearly
            if not os.environ.get(var):
                raise RuntimeError(f"{var} is not set; export it as the nnU-Net documentation describes")
        seed = _env("IAC_SEED", None, int)
        if seed is not None:                                      # the grid's seeds: weights drawn from the seed
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.device.type == "cpu":       # nnUNetv2_train -device cpu takes every core of the machine
            torch.set_num_threads(cpu_threads())
        self.num_epochs = _env("IAC_EPOCHS", self.num_epochs, int)
        self.num_iterations_per_epoch = _env("IAC_ITERS", self.num_iterations_per_epoch, int)
        self.num_val_iterations_per_epoch = _env("IAC_VAL_ITERS", self.num_val_iterations_per_epoch, int)
        self.save_every = _env("IAC_SAVE_EVERY", self.save_every, int)
        batch = _env("IAC_BATCH", None, int)
        if batch:
            self.print_to_log_file(f"batch {batch} (IAC_BATCH; the plans ask for "
                                   f"{self.configuration_manager.batch_size})")
            self.configuration_manager.configuration["batch_size"] = batch      # (a copy: the plans keep theirs)
        elif self.device.type == "cpu" and self.configuration_manager.batch_size > 16:
            self.print_to_log_file(f"note: the plans ask for batch {self.configuration_manager.batch_size}, slow on "
                                   "the CPU; IAC_BATCH=N sets another")
        install_stop_signals()

    def train_step(self, batch):
        check_stop()                                   # a stop signal: leave before the next step
        return super().train_step(batch)

    def run_training(self):
        try:
            super().run_training()
        except Preempted as e:
            self.stopped_by(e)
        ignore_stop_signals_at_exit()        # trained (checkpoint_final.pth): a signal must not kill its exit

    def stopped_by(self, signal_name):
        """A stop signal arrived: shut the data loaders and leave with REQUEUE_EXIT (`--c` continues); the stop is
        the last line printed."""
        self._finish_loaders()
        saved = os.path.isfile(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        self.print_to_log_file(f"stopped by {signal_name}: `nnUNetv2_train ... --c` continues from "
                               + ("checkpoint_latest.pth" if saved else "the start (no epoch saved yet)")
                               + f" (exit {REQUEUE_EXIT}: requeue)")
        sys.exit(REQUEUE_EXIT)

    def _finish_loaders(self):
        """Shut nnU-Net's data loaders before leaving early. A batch still in flight when its worker exits makes the
        loader's results thread fail (batchgenerators: the batch's shared memory went with the worker); once the
        run is leaving, that thread's traceback is noise, and it is not printed."""
        hook = threading.excepthook
        threading.excepthook = lambda a: None if "results_loop" in getattr(a.thread, "name", "") else hook(a)
        try:
            for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None)):
                if hasattr(loader, "_finish"):
                    loader._finish()
        finally:
            threading.excepthook = hook

    def perform_actual_validation(self, save_probabilities=False):
        if _env("IAC_FINAL_VALIDATION", "1") == "0":           # tests and demos: skip the sliding-window pass
            self.print_to_log_file("final validation skipped (IAC_FINAL_VALIDATION=0)")
            return
        super().perform_actual_validation(save_probabilities)


class nnUNetTrainerIAC(nnUNetTrainerIACRef):
    """Stage III in nnU-Net: the discrete cell of IAC_GENOTYPE on every skip of the frozen backbone it was searched
    on (find_backbone). Genotype, θ0 and backbone are read and checked when the trainer is made, before nnU-Net
    starts its data-loader workers, so a wrong one is the last thing printed."""
    theta0_init = False

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.genotype_path = _require_env("IAC_GENOTYPE", "give the genotype.json of the search")
        try:
            genotype = read_genotype(self.genotype_path)
        except GenotypeError as e:
            raise RuntimeError(str(e)) from None
        self.theta0_path = None
        if self.theta0_init:
            self.theta0_path = _env("IAC_THETA0", os.path.join(os.path.dirname(self.genotype_path), "theta0.pt"))
            if not os.path.isfile(self.theta0_path):
                raise RuntimeError(f"IAC_THETA0={self.theta0_path} does not exist: the theta0.pt of the search (beside "
                                   "its genotype.json)")
        self.backbone = find_backbone(self, genotype)
        self.print_to_log_file(f"IAC cell of {self.genotype_path}; backbone {self.backbone}")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        path = _require_env("IAC_GENOTYPE", "give the genotype.json this model is (or was) trained with")
        try:
            g = read_genotype(path)
        except GenotypeError as e:
            raise RuntimeError(str(e)) from None
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
        if not self.was_initialized:
            self.initialize()                             # the network, to load the backbone before the workers
        load_reference(self, self.backbone)
        if self.current_epoch == 0 and self.theta0_init:  # IAC-LTH: reset the found cell to θ0
            load_theta0_into(unwrap(self.network).skips, self.theta0_path, flag="IAC_THETA0")
        super().on_train_start()
        init = "theta0" if self.theta0_init else "fresh"
        record = {"genotype": os.path.abspath(self.genotype_path), "init": init, "theta0": self.theta0_path,
                  **self.backbone.info(), "backbone_how": self.backbone.how}
        atomic_write_json(os.path.join(self.output_folder, "iac_cell.json"), record)
        self.print_to_log_file(f"IAC cell: {self.genotype_path}, init {init}; backbone {self.backbone}")


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
        self.backbone = find_backbone(self)               # checked now, before nnU-Net starts its workers
        self.print_to_log_file(f"IAC search [{self.search_mode}] on the backbone {self.backbone}")

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

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()                             # the network, to load the backbone before the workers
        load_reference(self, self.backbone)
        super().on_train_start()

    def run_training(self):
        try:
            self._search()
        except Preempted as e:                            # the last finished epoch is in checkpoint_latest.pth
            self.stopped_by(e)

    def _search(self):
        s, mode = self.search, self.search_mode
        out = self.output_folder
        cont = getattr(self, "continue_from", None)
        if cont and os.path.isfile(os.path.join(out, "genotype.json")):
            self.print_to_log_file("the search has ended (genotype.json): nothing to continue")
            if not os.path.isfile(os.path.join(out, "done.json")):
                mark_done(out, type(self).__name__)
            return
        self.on_train_start()
        self.amp = search_amp(self.device)
        self.print_to_log_file(f"IAC search [{mode}]: bf16 autocast {'on' if self.amp else 'off'} (IAC_AMP), "
                               f"checkpointed per level: {[c.checkpoint_edges for c in self.network.skips.cells]}")
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
            save_theta0(os.path.join(out, "theta0.pt"), theta0, geometry, f"nnU-Net {type(self.network.net).__name__} "
                        f"{self.backbone.path} (sha256 {self.backbone.sha256})")
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
                check_stop()                                           # a stop signal: leave before this step
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
                       search_summary(mode, s, lth, epoch + 1, stopped, seconds, **self.backbone.info(),
                                      encoder=self.search_label(dims), dataset=self.plans_manager.dataset_name,
                                      seed=_env("IAC_SEED", None, int), geometry=geometry,
                                      plans=self.plans_manager.plans_name, configuration=self.configuration_name))
        self.print_to_log_file(f"genotype: {genotype['edges']}")
        self.on_train_end()
        mark_done(out, type(self).__name__, epochs_run=epoch + 1, stopped=stopped)   # 05 --search takes the folder

    def search_label(self, dims):
        """The search's `encoder` in genotype.json, which 05's search-cost table pairs LTH and full searches by:
        nnunet_2d / nnunet_3d, then the configuration where it is not 2d / 3d_fullres, _noda for the NoDA trainers,
        the plans where they are not nnU-Net's default, and the fold (fold0, ...)."""
        plans, conf = self.plans_manager.plans_name, self.configuration_name
        return (f"nnunet_{dims}d" + ("" if conf in ("2d", "3d_fullres") else f"_{conf}")
                + ("_noda" if type(self).__name__.endswith("NoDA") else "")
                + ("" if plans == "nnUNetPlans" else f"_{plans}") + f"_fold{self.fold}")

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
