"""Every checkpoint (.pt) of the project in one place: what each kind holds, writing it atomically,
reading it back with torch.load(weights_only=True), checking it, and rebuilding models from it.

    pretrain  02_pretrain.py   model, optimizer, epoch, args, config, best_dice, best_epoch, data
    finetune  04_finetune.py   the same; config["skip"] is iac / att / resatt, and for iac
                               config["genotype"] is the genotype dict and config["cell_channels"] its width
    search    03_search.py     skips, op_mask, edge_mask, a_opt, lth, epoch, seconds, args, geometry
    theta0    03_search.py and the nnU-Net search trainers: state (θ0, every op at full width,
              before any update), geometry, backbone

`data` is the slices.h5 a model was trained on (dataset, class_names, crop); `geometry` the cell's
skip_channels, up_channels and cell_channels. Every problem is an InputError naming the file.
"""
import hashlib
import os

import torch

from common.backbones import build_unet
from common.iac import EDGES, NODES, OPS, GenotypeError, IACSkips, init_from_theta0, read_genotype
from common.search import changed_settings
from common.skips import build_skips
from common.utils import InputError, require_file

KINDS = ("pretrain", "finetune", "search", "theta0")


def save_checkpoint(ckpt, path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    if ckpt.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind {ckpt.get('kind')!r} is not one of {KINDS}")
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind, map_location="cpu", flag="checkpoint"):
    """torch.load(weights_only=True) of a checkpoint of `kind` (a kind or a tuple of kinds); a missing,
    corrupt or foreign file is an InputError naming `flag` and the path."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    require_file(path, flag, f"a {' or '.join(kinds)} checkpoint of this project")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign format: all mean "not ours"
        raise InputError(f"{flag} {path}: cannot read it ({type(e).__name__}: {e}); "
                         "it is corrupt or was not written by this project") from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in kinds:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"{flag} {path}: not a {' or '.join(kinds)} checkpoint of this project (found {found!r})")
    return ckpt


# --------------------------------------------------------------------------- stages I and III
def data_signature(meta):
    """What a trained model must share with the slices.h5 it is used on."""
    return {"dataset": meta["dataset"], "class_names": meta["class_names"], "crop": meta["crop"],
            "spacing": meta.get("spacing")}


def check_same_data(ckpt, meta, path):
    """A checkpoint is used on the data it was trained on: data set, classes, crop and in-plane spacing (the last
    two only where the checkpoint recorded them: older ones did not keep the spacing)."""
    d = ckpt["data"]
    if d["dataset"] != meta["dataset"] or d["class_names"] != meta["class_names"]:
        raise InputError(f"{path} was trained on {d['dataset']} {d['class_names']}, the data is "
                         f"{meta['dataset']} {meta['class_names']}")
    for key, flag in (("crop", "--crop"), ("spacing", "--spacing")):
        if key in d and d[key] != meta.get(key):
            raise InputError(f"{path} was trained on slices made with {flag} {d[key]}, this slices.h5 has "
                             f"{meta.get(key)}; use the slices.h5 it was trained on (01_preprocess.py {flag})")


def training_checkpoint(kind, model, optimizer, epoch, args, best, meta):
    """A pretrain / finetune checkpoint: everything --resume needs and everything 05 needs to rebuild the model."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "args": vars(args), "config": model.config, "best_dice": best[0], "best_epoch": best[1],
            "data": data_signature(meta)}


def resume_training(path, kind, model, optimizer, device):
    """Load RUN/ckpt_last.pt into `model` and `optimizer`; returns (first epoch to run, (best Dice, its epoch),
    the mid-epoch position to continue that epoch from, or None)."""
    ckpt = load_checkpoint(path, kind, map_location=device)
    if ckpt["config"] != model.config:
        raise InputError(f"{path} holds a {ckpt['config']} model, the flags ask for {model.config}; resume with "
                         "the same flags, or start over with --overwrite")
    best_path = os.path.join(os.path.dirname(path), "ckpt_best.pt")
    if ckpt["best_epoch"] >= 0:                          # the best checkpoint the last one names must be there
        if not os.path.isfile(best_path):
            raise InputError(f"{path} names epoch {ckpt['best_epoch'] + 1} as the best, but {best_path} is missing; "
                             "start over with --overwrite")
        best_epoch = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        if best_epoch < ckpt["best_epoch"]:
            raise InputError(f"{best_path} is from epoch {best_epoch + 1}, older than the best epoch "
                             f"{ckpt['best_epoch'] + 1} that {path} names; start over with --overwrite")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"] + 1, (ckpt["best_dice"], ckpt["best_epoch"]), ckpt.get("position")


def weights_hash(state):
    """The identity of a model's weights: the first 16 hex digits of the sha256 over its state dict (names, shapes,
    dtypes and bytes, in name order). Another file with the same weights has the same hash; another seed's
    training, or one more step, does not."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def nnunet_network_class(plans, configuration):
    """The network class (e.g. PlainConvUNet, ResidualEncoderUNet) nnU-Net v2's plans build for `configuration`,
    following "inherits_from" (3d_cascade_fullres, custom configurations); "?" where the plans do not say. Plain
    JSON, no nnunetv2 import: nnunet_iac's trainers read it from a checkpoint, 05 from a prediction folder."""
    confs = plans.get("configurations", {})
    conf, seen = dict(confs.get(configuration, {})), {configuration}
    while "architecture" not in conf and "UNet_class_name" not in conf and conf.get("inherits_from") not in seen:
        parent = conf.pop("inherits_from", None)
        if parent not in confs:
            break
        seen.add(parent)
        conf = {**confs[parent], **conf}
    name = conf.get("architecture", {}).get("network_class_name") or conf.get("UNet_class_name") or "?"   # (old plans)
    return name.rsplit(".", 1)[-1]


def check_searched_backbone(genotype, path, sha256, allow_other, flag="--backbone"):
    """Stage III trains a cell in the backbone it was searched in (paper Sec. 6.3): a backbone whose weights differ
    from the ones genotype.json recorded at search time is refused, naming both, unless `allow_other` (a
    deliberate transfer). Returns a note for the log ("" when they match)."""
    searched = genotype.get("search", {})
    want = searched.get("backbone_sha256")
    if not want:
        return "the genotype records no backbone hash (an older search): not checked"
    if want == sha256:
        return ""
    if not allow_other:
        raise InputError(f"the cell of this genotype was searched on {searched.get('backbone')} (weights sha256 "
                         f"{want}), {flag} {path} has other weights (sha256 {sha256}): a cell is trained in the "
                         "backbone it was searched in. Give that backbone, or --allow_other_backbone for a "
                         "deliberate transfer (recorded in args.json)")
    return f"transferred: searched on {searched.get('backbone')} (sha256 {want}), --allow_other_backbone"


def load_frozen_backbone(path, meta):
    """A stage I checkpoint -> its U-Net with the backbone frozen (on CPU) and the checkpoint;
    refuses a backbone trained on another data set."""
    ckpt = load_checkpoint(path, "pretrain", flag="--backbone")
    check_same_data(ckpt, meta, path)
    model = build_unet(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.freeze_backbone()
    return model, ckpt


def load_genotype(path):
    """A genotype.json, checked: a bad one (unknown op, bad node index, ...) is an InputError naming the file."""
    try:
        return read_genotype(path)
    except GenotypeError as e:
        raise InputError(str(e)) from e


def cell_config(genotype, cell_channels, cell_output="replace"):
    """What a finetune model config keeps of its cell: the whole genotype (edges, concat), the width, the output."""
    return {"skip": "iac", "genotype": {"edges": genotype["edges"], "concat": list(NODES)},
            "cell_channels": cell_channels, "cell_output": cell_output}


def model_from_checkpoint(ckpt):
    """Rebuild a trained model from a stage I (pretrain) or stage III (finetune) checkpoint."""
    cfg = ckpt["config"]
    if ckpt["kind"] == "pretrain":
        model = build_unet(cfg)
    else:
        model = build_unet({**cfg, "skip": "ref"})
        if cfg["skip"] == "iac":
            genotype = cfg["genotype"]
            if isinstance(genotype, list):                       # checkpoints before the dict: edges only
                genotype = {"edges": genotype, "concat": list(NODES)}
            try:
                skips = IACSkips(genotype, model.skip_channels, model.up_channels, cfg.get("cell_channels"),
                                 output=cfg.get("cell_output", "replace"))
            except GenotypeError as e:
                raise InputError(f"the checkpoint's cell: {e}") from e
            model.set_skips(skips)
        else:
            model.set_skips(build_skips(cfg["skip"], model.skip_channels, model.up_channels, None))
    model.load_state_dict(ckpt["model"])
    return model


# --------------------------------------------------------------------------- stage II
def save_theta0(path, theta0, geometry, backbone):
    save_checkpoint({"kind": "theta0", "state": theta0, "geometry": geometry, "backbone": backbone}, path)


def load_theta0_into(skips, path, flag="--theta0"):
    """IAC-LTH's reset (docs/method.md §5): the discrete cell `skips` takes its weights at search start from
    theta0.pt."""
    theta0 = load_checkpoint(path, "theta0", flag=flag)
    try:
        init_from_theta0(skips, theta0["state"], strict_shapes=True)
    except (KeyError, ValueError) as e:
        raise InputError(f"{flag} {path} does not fit this cell: {e}") from e


def search_checkpoint(skips, a_opt, lth, epoch, seconds, args, geometry):
    return {"kind": "search", "skips": skips.state_dict(), "op_mask": skips.op_mask.cpu(),
            "edge_mask": skips.edge_mask.cpu(), "a_opt": a_opt.state_dict(), "lth": lth.state_dict(),
            "epoch": epoch, "seconds": seconds, "args": vars(args), "geometry": geometry}


def apply_masks(skips, op_mask, edge_mask):
    """Prune a fresh supernet to a checkpoint's masks (its modules gone, as in the search) before load_state_dict."""
    for e in range(len(EDGES)):
        if not edge_mask[e] and skips.edge_mask[e]:
            skips.prune_edge(e)
        elif edge_mask[e]:
            for o in range(len(OPS)):
                if not op_mask[e, o] and skips.op_mask[e, o]:
                    skips.prune_op(e, o)
    skips.op_mask.copy_(op_mask)


def resume_search(path, skips, a_opt, lth, args, geometry, device):
    """Load RUN/ckpt_last.pt of a search (pruned ops stay pruned); refuses one whose result-affecting
    flags or cell geometry differ from this run's, naming them. Returns (first epoch to run, seconds, the mid-epoch
    position to continue that epoch from, or None)."""
    ckpt = load_checkpoint(path, "search", map_location=device)
    changed = changed_settings(ckpt["args"], vars(args))
    if changed or ckpt["geometry"] != geometry:
        what = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changed.items()) or "cell geometry"
        raise InputError(f"{path} is a search with other settings ({what}); resume with the same flags, or "
                         "start over with --overwrite")
    apply_masks(skips, ckpt["op_mask"].to(device), ckpt["edge_mask"].to(device))
    skips.load_state_dict(ckpt["skips"])
    a_opt.load_state_dict(ckpt["a_opt"])
    lth.load_state_dict(ckpt["lth"])
    return ckpt["epoch"] + 1, ckpt["seconds"], ckpt.get("position")
