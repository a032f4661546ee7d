"""The training loop: stream crops, optimise, validate on a reconstructed region, checkpoint.

``train(cfg)`` runs one model (or one per held-out fragment with ``folds="loo"``). It keeps
the checkpoint with the best validation F0.5 together with the threshold searched for it, the
last checkpoint for ``resume``, a metrics CSV and a PNG plot, all in ``cfg.out``.
Launched by ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from inkpipe.pipeline.blending import sliding_window_predict
from inkpipe.pipeline.errors import ConfigError, TrainingError
from inkpipe.pipeline.images import atomic_path
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.pipeline.metrics import search_threshold
from inkpipe.pipeline.store import Fragment, open_fragments
from inkpipe.pipeline.volume import VolumeView

from .augment import build_augment
from .checkpoint import (
    checkpoint_payload,
    load_checkpoint,
    make_predictor,
    save_checkpoint,
    select_device,
)
from .config import TrainConfig, Validation
from .data import CropDataset, CropTable, WindowSampler, WindowSet
from .losses import build_loss, per_sample_loss
from .models import build_model, count_parameters

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "val_f05",
    "val_precision",
    "val_recall",
    "threshold",
    "lr",
    "seconds",
    "crops_per_s",
)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one run: best validation F0.5, its threshold and the files written."""

    out: Path
    best_f05: float
    threshold: float
    best_epoch: int
    epochs_run: int
    best_path: Path
    last_path: Path


# ---------------------------------------------------------------------------------------
# data preparation


@dataclass(frozen=True)
class Plan:
    """Which fragments and windows train and validate a run."""

    fragments: list[Fragment]
    train_sets: list[WindowSet]
    val_windows: CropTable  # (n, 3) held-out windows (patches validation)
    val_fragment: int | None  # index into fragments (fragment validation)
    tile_px: int


def plan_run(cfg: TrainConfig) -> Plan:
    """Open the store and decide training windows and validation data.

    Raises:
        ConfigError: unknown fragments, layers that do not fit, mixed tile sizes, a held-out
            fragment without labels, or no positive training window.
    """
    fragments = open_fragments(cfg.store)
    by_id = {f.id: f for f in fragments}
    labelled = [f.id for f in fragments if f.meta.has_labels]
    wanted = list(cfg.fragments) if cfg.fragments else labelled
    for fid in wanted:
        if fid not in by_id:
            raise ConfigError(
                f"fragment '{fid}' is not in store {cfg.store} (it has: {', '.join(by_id)})"
            )
        if not by_id[fid].meta.has_labels:
            raise ConfigError(f"fragment '{fid}' has no ink labels and cannot be trained on")
    val_id = cfg.val.fragment if cfg.val.kind == "fragment" else None
    if val_id is not None:
        if val_id not in by_id or not by_id[val_id].meta.has_labels:
            raise ConfigError(
                f"validation fragment '{val_id}' must be a labelled fragment of {cfg.store} "
                f"(labelled: {', '.join(labelled) or 'none'})"
            )
        wanted = [f for f in wanted if f != val_id]
    if not wanted:
        raise ConfigError(f"no labelled fragment left to train on in {cfg.store}")
    used = wanted + ([val_id] if val_id is not None else [])
    frags = [by_id[f] for f in used]
    for f in frags:
        cfg.layers.check(f.meta.layers, where=f"fragment {f.id} of {cfg.store}")
    tiles = {f.settings.tile_px for f in frags}
    if len(tiles) != 1:
        raise ConfigError(
            f"fragments of {cfg.store} were indexed with different tiles {sorted(tiles)}; "
            "re-ingest with one --tile"
        )
    tile = tiles.pop()
    sets = [
        WindowSet(i, f.meta.shape[1:], f.windows()) for i, f in enumerate(frags) if f.id in wanted
    ]
    rng = np.random.default_rng([cfg.seed, 7])
    val_windows = np.zeros((0, 3), np.int64)
    if cfg.val.kind == "patches":
        val_windows = pick_held_out(sets, cfg.val.patches, tile, rng, tile + cfg.jitter_px)
        sets = exclude_near(sets, val_windows, tile + cfg.jitter_px)
    if not any((s.windows[:, 3] > 0).any() for s in sets):
        raise TrainingError(
            f"no training window of {cfg.store} contains ink (fragments {', '.join(wanted)}); "
            "check the ink labels, or lower --min-coverage at ingest"
        )
    val_index = len(frags) - 1 if val_id is not None else None
    return Plan(frags, sets, val_windows, val_index, tile)


def pick_held_out(
    sets: list[WindowSet], n: int, tile_px: int, rng: np.random.Generator, distance_px: int = 0
) -> CropTable:
    """Pick up to ``n`` non-overlapping windows, half with ink where possible.

    A window is only taken while at least half of all windows, and one with ink, stay
    trainable after :func:`exclude_near` with ``distance_px`` (0: ``tile_px``) — so a small
    store gets fewer held-out windows instead of none to train on.

    Returns:
        (m, 3) int64 (fragment, y0, x0), m <= n.
    """
    table = np.concatenate(
        [
            np.column_stack(
                [np.full(len(s.windows), s.fragment), s.windows[:, :2], s.windows[:, 3] > 0]
            )
            for s in sets
        ]
    ).astype(np.int64)
    distance = distance_px or tile_px
    trainable = np.ones(len(table), bool)
    pos = rng.permutation(np.flatnonzero(table[:, 3] == 1))
    neg = rng.permutation(np.flatnonzero(table[:, 3] == 0))
    order = np.concatenate([pos[: n // 2], neg, pos[n // 2 :]])
    chosen: list[NDArray[np.int64]] = []
    for i in order:
        row = table[i, :3]
        same = table[:, 0] == row[0]
        dy, dx = np.abs(table[:, 1] - row[1]), np.abs(table[:, 2] - row[2])
        if any(
            c[0] == row[0] and abs(c[1] - row[1]) < tile_px and abs(c[2] - row[2]) < tile_px
            for c in chosen
        ):
            continue
        left = trainable & ~(same & (dy < distance) & (dx < distance))
        if left.sum() < len(table) / 2 or not (left & (table[:, 3] == 1)).any():
            continue
        trainable = left
        chosen.append(row)
        if len(chosen) == n:
            break
    return np.array(chosen, dtype=np.int64).reshape(-1, 3)


def exclude_near(sets: list[WindowSet], held: CropTable, distance_px: int) -> list[WindowSet]:
    """Drop training windows closer than ``distance_px`` (in y and x) to a held-out window."""
    out = []
    for s in sets:
        h = held[held[:, 0] == s.fragment]
        keep = np.ones(len(s.windows), bool)
        for _, y, x in h:
            keep &= ~(
                (np.abs(s.windows[:, 0] - y) < distance_px)
                & (np.abs(s.windows[:, 1] - x) < distance_px)
            )
        out.append(WindowSet(s.fragment, s.shape, s.windows[keep]))
    return out


# ---------------------------------------------------------------------------------------
# distributed helpers


@dataclass(frozen=True)
class Dist:
    """Rank and world size (1 process unless launched by torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """True on the process that validates, logs and saves."""
        return self.rank == 0


@contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield Dist(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _agree(flag: bool, d: Dist, device: torch.device) -> bool:
    """Return rank 0's ``flag`` on every rank (so all ranks stop together)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class ValScore:
    """Validation result of one epoch."""

    f05: float
    precision: float
    recall: float
    threshold: float


def validate(
    model: nn.Module,
    plan: Plan,
    dataset: CropDataset,
    cfg: TrainConfig,
    device: torch.device,
    out_dir: Path,
) -> ValScore | None:
    """Score the model on the held-out region: F0.5 over all its pixels, threshold searched.

    Patches: each held-out window is predicted whole (they do not overlap). Fragment: the
    held-out fragment is predicted on a grid with Gaussian blending, as ``inkpipe predict``
    does, and scored inside its mask.
    """
    predict = make_predictor(model, device)
    if plan.val_fragment is not None:
        frag = plan.fragments[plan.val_fragment]
        view = VolumeView(
            frag.volume, cfg.layers, dataset.normalizers[plan.val_fragment], cfg.cache_mb / 2
        )
        mask = frag.mask()
        h, w = mask.shape
        stride = cfg.val_stride_px or plan.tile_px // 2
        spill = out_dir / ".val_canvas" if h * w > 32e6 else None
        prob = sliding_window_predict(
            view, predict, plan.tile_px, stride, cfg.batch_size, valid=mask, out_dir=spill
        )
        truth = frag.labels()
        best_t, best_f, table = search_threshold(prob, truth, valid=mask)
    elif len(plan.val_windows):
        probs, truths, valids = [], [], []
        for i in range(0, len(plan.val_windows), cfg.batch_size):
            items = [
                dataset.item(tuple(k), augment=False)
                for k in plan.val_windows[i : i + cfg.batch_size]
            ]
            x = np.stack([it["image"].numpy() for it in items])
            probs.append(predict(x))
            truths.append(np.stack([it["label"][0].numpy() for it in items]))
            valids.append(np.stack([it["valid"][0].numpy() for it in items]))
        best_t, best_f, table = search_threshold(
            np.concatenate(probs), np.concatenate(truths) > 0, valid=np.concatenate(valids) > 0
        )
    else:
        return None
    row = next(r for r in table if r.threshold == best_t)
    model.train()
    return ValScore(best_f, row.precision, row.recall, best_t)


# ---------------------------------------------------------------------------------------
# hard-negative mining


def mine_hard_negatives(
    model: nn.Module,
    sampler: WindowSampler,
    dataset: CropDataset,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
) -> CropTable:
    """Score a random sample of negative windows and return the highest-loss fraction.

    Returns:
        (m, 3) int64 crops, m = ceil(hard_negatives x sample size).
    """
    rng = np.random.default_rng([cfg.seed, epoch, 11])
    negatives = sampler.negatives
    if len(negatives) == 0:
        return negatives
    sample = negatives[
        rng.choice(len(negatives), min(cfg.hard_negative_sample, len(negatives)), replace=False)
    ]
    losses = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(sample), cfg.batch_size):
            items = [dataset.item(tuple(k), augment=False) for k in sample[i : i + cfg.batch_size]]
            x = torch.stack([it["image"] for it in items]).to(device)
            y = torch.stack([it["label"] for it in items]).to(device)
            v = torch.stack([it["valid"] for it in items]).to(device)
            losses.append(per_sample_loss(cfg.loss, model(x).float(), y, v).cpu())
    model.train()
    keep = max(1, math.ceil(cfg.hard_negatives * len(sample)))
    order = torch.cat(losses).argsort(descending=True)[:keep].numpy()
    return sample[order]


# ---------------------------------------------------------------------------------------
# logging


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch metrics CSV (atomically)."""
    tmp = atomic_path(path)
    try:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Plot loss, validation F0.5 and threshold over epochs to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [_num(r["val_f05"]) for r in rows], marker="o", color="tab:green")
    axes[1].set_title("validation F0.5")
    axes[1].set_ylim(0, 1)
    axes[2].plot(epochs, [_num(r["threshold"]) for r in rows], marker="o", color="tab:orange")
    axes[2].set_title("threshold")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = atomic_path(path)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _num(v: Any) -> float:
    return float("nan") if v in ("", None) else float(v)


# ---------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> list[TrainResult]:
    """Train one model, or one per held-out labelled fragment when ``cfg.folds == "loo"``."""
    if cfg.folds == "loo":
        ids = cfg.fragments or tuple(f.id for f in open_fragments(cfg.store) if f.meta.has_labels)
        if len(ids) < 2:
            raise ConfigError(
                f"--folds loo needs at least 2 labelled fragments, {cfg.store} has {len(ids)}"
            )
        results = []
        for fid in ids:
            log(f"fold {fid}: validating on fragment {fid}, training on the others")
            fold = replace(
                cfg,
                out=cfg.out / f"fold_{fid}",
                folds=None,
                fragments=tuple(ids),
                val=Validation("fragment", 0, fid),
            )
            results.extend(train(fold, log))
        return results
    return [train_one(cfg, log)]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train_one(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train one model as configured; see the module docstring."""
    device = select_device(cfg.device)
    plan = plan_run(cfg)
    retain_freed_memory()  # crops are allocated and freed thousands of times a second
    with distributed(device) as d:
        return _train(cfg, plan, device, d, log if d.main else (lambda s: None))


def _train(
    cfg: TrainConfig, plan: Plan, device: torch.device, d: Dist, log: Callable[[str], None]
) -> TrainResult:
    out = Path(cfg.out)
    best_path, last_path = out / "best.pt", out / "last.pt"
    _seed_everything(cfg.seed + d.rank)
    workers = cfg.workers
    augment = build_augment(cfg.aug, plan.tile_px, seed=cfg.seed + d.rank)
    dataset = CropDataset(
        plan.fragments, cfg.layers, plan.tile_px, augment, cache_mb=cfg.cache_mb / max(workers, 1)
    )
    sampler = WindowSampler(
        plan.train_sets,
        plan.tile_px,
        cfg.steps_per_epoch * cfg.batch_size * d.world_size,
        cfg.batch_size,
        workers,
        cfg.pos_fraction,
        cfg.jitter_px,
        region_px=int(plan.fragments[0].volume.chunks[1]),  # sweep chunk by chunk
        seed=cfg.seed,
        rank=d.rank,
        world_size=d.world_size,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if d.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.model.name == "unet",  # smp's encoder head is unused
        )
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    period = max(cfg.restart_epochs * cfg.steps_per_epoch, 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=period, eta_min=cfg.lr * 0.01
    )
    if cfg.warmup_steps > 0:
        warm = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=0.01, total_iters=cfg.warmup_steps
        )
        sched: Any = torch.optim.lr_scheduler.SequentialLR(
            opt, [warm, cosine], milestones=[cfg.warmup_steps]
        )
    else:
        sched = cosine
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rows: list[dict[str, Any]] = []
    start_epoch, best_f, best_t, best_epoch = 0, -1.0, 0.5, -1
    if cfg.resume:
        if not last_path.is_file():
            raise ConfigError(
                f"--resume: no {last_path} to resume from; drop --resume to start afresh"
            )
        ck = load_checkpoint(last_path)
        saved = ck.config
        for key in ("layers", "model", "store"):
            if str(saved.get(key)) != str(cfg.to_dict()[key]):
                raise ConfigError(
                    f"--resume: {last_path} was trained with {key}={saved.get(key)}, not "
                    f"{cfg.to_dict()[key]}; use the same options or another --out"
                )
        model.load_state_dict(ck.state_dict)
        opt.load_state_dict(ck.extra["optimizer"])
        sched.load_state_dict(ck.extra["scheduler"])
        scaler.load_state_dict(ck.extra["scaler"])
        rows = list(ck.extra.get("history", []))
        start_epoch = int(ck.extra["epoch"]) + 1
        best_f, best_t, best_epoch = (
            float(ck.extra["best_f05"]),
            float(ck.extra["best_threshold"]),
            int(ck.extra["best_epoch"]),
        )
        log(f"resuming {out} at epoch {start_epoch + 1}")
    elif d.main and last_path.exists():
        raise ConfigError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose "
            "another --out"
        )
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log(
            f"training {cfg.model.name} ({count_parameters(model) / 1e6:.2f} M parameters) on "
            f"{', '.join(f.id for i, f in enumerate(plan.fragments) if i != plan.val_fragment)}, "
            f"layers {cfg.layers}, tile {plan.tile_px}, device {device.type}, "
            f"validation {cfg.val}"
            + (f" ({len(plan.val_windows)} windows)" if cfg.val.kind == "patches" else "")
        )
    _barrier(d)
    config = cfg.to_dict()
    started = time.perf_counter()

    for epoch in range(start_epoch, cfg.epochs):
        spent = cfg.max_minutes is not None and time.perf_counter() - started > cfg.max_minutes * 60
        if _agree(spent, d, device):
            log(f"stopping after epoch {epoch}: the --max-minutes {cfg.max_minutes} are spent")
            break
        t0 = time.perf_counter()
        if cfg.hard_negatives > 0 and epoch > 0:
            sampler.set_hard_negatives(
                mine_hard_negatives(model, sampler, dataset, cfg, device, epoch)
            )
        sampler.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        bar = tqdm(
            loader,
            total=len(loader),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (cfg.progress and d.main),
        )
        for step, batch in enumerate(bar):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            v = batch["valid"].to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y, v)
            if not torch.isfinite(loss):
                kept = (
                    f"the best checkpoint is kept at {best_path}"
                    if best_path.exists()
                    else "no checkpoint was saved yet"
                )
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; {kept}. "
                    "Lower --lr, raise --warmup-steps, or try --loss bce"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        score = validate(model, plan, dataset, cfg, device, out) if d.main else None
        row = {
            "epoch": epoch + 1,
            "train_loss": round(total / max(count, 1), 6),
            "val_f05": "" if score is None else round(score.f05, 6),
            "val_precision": "" if score is None else round(score.precision, 6),
            "val_recall": "" if score is None else round(score.recall, 6),
            "threshold": "" if score is None else score.threshold,
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 2),
            "crops_per_s": round(count * d.world_size / max(train_seconds, 1e-9), 1),
        }
        rows.append(row)
        if d.main:
            f05 = score.f05 if score is not None else -row["train_loss"]
            metrics = {
                k: row[k] for k in ("epoch", "train_loss", "val_f05", "val_precision", "val_recall")
            }
            threshold = score.threshold if score is not None else 0.5

            payload = partial(
                checkpoint_payload,
                model,
                cfg.model,
                cfg.layers,
                plan.tile_px,
                threshold,
                metrics,
                config,
                epoch=epoch,
            )
            if f05 > best_f:
                best_f, best_epoch, best_t = f05, epoch + 1, threshold
                save_checkpoint(best_path, payload())
            save_checkpoint(
                last_path,
                payload(
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(),
                    scaler=scaler.state_dict(),
                    history=rows,
                    best_f05=best_f,
                    best_threshold=best_t,
                    best_epoch=best_epoch,
                ),
            )
            write_metrics(out / "metrics.csv", rows)
            plot_metrics(out / "metrics.png", rows)
            val_text = (
                ""
                if score is None
                else (
                    f", val F0.5 {score.f05:.3f} (P {score.precision:.3f}, "
                    f"R {score.recall:.3f}) at threshold {score.threshold:.2f}"
                )
            )
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}{val_text}, "
                f"{row['crops_per_s']:.0f} crops/s, {row['seconds']:.0f} s"
            )
        _barrier(d)
    if d.main:
        log(
            f"best val F0.5 {max(best_f, 0):.3f} at epoch {best_epoch} "
            f"(threshold {best_t:.2f}): {best_path}"
        )
    return TrainResult(out, max(best_f, 0.0), best_t, best_epoch, len(rows), best_path, last_path)
