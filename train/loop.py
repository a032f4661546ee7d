"""The trainer: stream crops, optimise, validate, checkpoint — each step a small method.

``train(cfg)`` runs one model (or one per held-out fragment with ``folds="loo"``). A
:class:`Trainer` holds what does not change during a run (plan, data, loss); a
:class:`RunState` holds what does (model, EMA, optimiser, scheduler, scaler, history, best).
The steps are :meth:`Trainer.build`, :meth:`Trainer.resume`, :meth:`Trainer.train_epoch`,
:meth:`Trainer.validate` and :meth:`Trainer.end_epoch`; :meth:`Trainer.run` strings them
together. The run folder gets the checkpoint with the best validation F0.5 together with the
threshold searched for it (``best.pt``), the last checkpoint for ``--resume`` (``last.pt``),
``metrics.csv``, ``metrics.png`` and ``config.yaml`` (and TensorBoard event files with
``--tensorboard``). Launched by ``torchrun`` (WORLD_SIZE > 1) it trains with
DistributedDataParallel, one GPU per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.numerics.metrics import search_threshold
from inkpipe.pipeline.disk import disk_full_as_error
from inkpipe.pipeline.errors import ConfigError, TrainingError
from inkpipe.pipeline.locks import hold_lock
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import RegionView, VolumeView, normalizer_for

from .augment import build_augment
from .checkpoint import (
    checkpoint_payload,
    load_checkpoint,
    make_predictor,
    save_checkpoint,
    select_device,
)
from .config import TrainConfig, Validation, ValidationKind
from .data import CropDataset, WindowSampler
from .distributed import Dist, agree, barrier, distributed
from .history import TensorBoardLog, plot_metrics, write_metrics
from .losses import build_loss, coarse_targets
from .mining import mine_hard_negatives
from .models import SMALL_2D, ModelSpec, build_model, count_parameters
from .recipe import EPOCHS_WITHIN_BUDGET, describe, resolve
from .rng import capture_rng, restore_rng
from .split import Plan, plan_run

# Saved with the configuration of the run they continue; another value refuses --resume.
RESUME_KEYS = ("layers", "model", "store", "tile_px")


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


@dataclass(frozen=True)
class ValScore:
    """Validation result of one epoch."""

    f05: float
    precision: float
    recall: float
    threshold: float


@dataclass
class Best:
    """The best epoch so far (``f05 = -1``: none yet)."""

    f05: float = -1.0
    threshold: float = 0.5
    epoch: int = -1


@dataclass
class RunState:
    """Everything a run changes as it goes; ``last.pt`` saves it for ``--resume``."""

    model: nn.Module
    net: nn.Module  # ``model``, or DistributedDataParallel around it
    ema: AveragedModel | None
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    epoch: int = 0  # the next epoch to run
    step: int = 0  # optimiser steps so far

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass(frozen=True)
class EpochStats:
    """What one (possibly shortened) epoch of training did."""

    loss: float
    crops: int
    steps: int
    seconds: float
    out_of_time: bool


class Trainer:
    """One training run: the fixed parts (config, plan, data, loss) and the steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        plan: Plan,
        device: torch.device,
        d: Dist,
        log: Callable[[str], None],
    ) -> None:
        # resolved by the recipe
        assert cfg.model is not None and cfg.batch_size is not None and cfg.epochs is not None
        self.epochs: int = cfg.epochs
        # "epoch 3/20", or "epoch 3" when the time budget decides
        self.of_epochs = f"/{cfg.epochs}" if cfg.epochs < EPOCHS_WITHIN_BUDGET else ""
        self.cfg, self.plan, self.device, self.d, self.log = cfg, plan, device, d, log
        self.board: TensorBoardLog | None = None  # --tensorboard, on rank 0: opened by start()
        self.spec: ModelSpec = cfg.model
        self.batch_size: int = cfg.batch_size
        self.out = Path(cfg.out)
        self.best_path, self.last_path = self.out / "best.pt", self.out / "last.pt"
        self.amp = device.type == "cuda"
        self.loss_fn = build_loss(cfg.loss)
        self.deadline = (
            None if cfg.max_minutes is None else time.perf_counter() + cfg.max_minutes * 60
        )
        workers = cfg.workers
        augment = build_augment(cfg.aug, plan.tile_px, seed=cfg.seed + d.rank)
        self.dataset = CropDataset(
            plan.fragments,
            cfg.layers,
            plan.tile_px,
            augment,
            cache_mb=cfg.cache_mb / max(workers, 1),
            depth_shift=cfg.depth_shift,
            normalize=cfg.normalize,
        )
        self.sampler = WindowSampler(
            plan.train_sets,
            plan.tile_px,
            cfg.steps_per_epoch * self.batch_size * d.world_size,
            self.batch_size,
            workers,
            cfg.pos_fraction,
            cfg.jitter_px,
            region_px=int(plan.fragments[0].volume.chunks[1]),  # sweep chunk by chunk
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    # -------------------------------------------------------------------------- build

    def build(self) -> RunState:
        """Build model, EMA, optimiser, warm-up + cosine-restart schedule and scaler."""
        cfg = self.cfg
        model = build_model(self.spec).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        net: nn.Module = model
        if self.d.world_size > 1:
            net = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                output_device=self.device.index if self.device.type == "cuda" else None,
                # smp encoders (unet, or stem3d with an smp 2-D net) leave their head unused
                find_unused_parameters=self.spec.name == "unet"
                or (self.spec.name == "stem3d" and self.spec.encoder != SMALL_2D),
            )
        ema = None
        if cfg.ema_decay > 0:
            ema = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        period = max(cfg.restart_epochs * cfg.steps_per_epoch, 1)
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=period, eta_min=cfg.lr * 0.01
        )
        if cfg.warmup_steps > 0:
            warm = torch.optim.lr_scheduler.LinearLR(
                opt, start_factor=0.01, total_iters=cfg.warmup_steps
            )
            sched = torch.optim.lr_scheduler.SequentialLR(
                opt, [warm, sched], milestones=[cfg.warmup_steps]
            )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        return RunState(model, net, ema, opt, sched, scaler)

    def resume(self, state: RunState) -> None:
        """Load ``last.pt`` into ``state`` (``--resume``), refusing another run's checkpoint."""
        ck = load_checkpoint(self.last_path, trust=self.cfg.trust_checkpoint)
        now = self.cfg.to_dict()
        for key in RESUME_KEYS:
            if str(ck.config.get(key)) != str(now[key]):
                raise ConfigError(
                    f"--resume: {self.last_path} was trained with {key}={ck.config.get(key)}, "
                    f"not {now[key]}; use the same options or another --out"
                )
        x = ck.extra
        state.model.load_state_dict(x.get("train_state_dict", ck.state_dict))
        if state.ema is not None:
            state.ema.module.load_state_dict(ck.state_dict)
            state.ema.n_averaged.fill_(int(x.get("ema_updates", 1)))
        state.opt.load_state_dict(x["optimizer"])
        state.sched.load_state_dict(x["scheduler"])
        state.scaler.load_state_dict(x["scaler"])
        state.history = list(x.get("history", []))
        state.epoch = int(x["epoch"]) + 1
        state.step = int(x.get("step", 0))
        state.best = Best(float(x["best_f05"]), float(x["best_threshold"]), int(x["best_epoch"]))
        if "rng" in x and self.d.world_size == 1:  # continue the random streams (train/rng.py)
            restore_rng(x["rng"], self.dataset.augment, self.loader.generator)
        self.log(f"resuming {self.out} at epoch {state.epoch + 1}")

    # -------------------------------------------------------------------------- train

    def out_of_time(self) -> bool:
        """Whether the ``--max-minutes`` budget is spent (rank 0 decides for all ranks)."""
        if self.deadline is None:
            return False
        return agree(time.perf_counter() > self.deadline, self.d, self.device)

    def train_epoch(self, state: RunState) -> EpochStats:
        """Run one epoch of optimiser steps, stopping early when the time budget is spent."""
        cfg, device = self.cfg, self.device
        t0 = time.perf_counter()
        if cfg.hard_negatives > 0 and state.epoch > 0:
            hard = mine_hard_negatives(
                state.model, self.sampler, self.dataset, cfg, device, state.epoch
            )
            self.sampler.set_hard_negatives(hard)
        self.sampler.set_epoch(state.epoch)
        state.net.train()
        total, crops, steps, stopped = 0.0, 0, 0, False
        bar = tqdm(
            self.loader,
            total=len(self.loader),
            desc=f"epoch {state.epoch + 1}{self.of_epochs}",
            leave=False,
            disable=not (cfg.progress and self.d.main),
        )
        for batch in bar:
            loss = self.step(state, batch)
            total += loss * len(batch["image"])
            crops += len(batch["image"])
            steps += 1
            bar.set_postfix(loss=f"{total / crops:.4f}")
            if self.out_of_time():
                stopped = True
                break
        bar.close()
        return EpochStats(total / max(crops, 1), crops, steps, time.perf_counter() - t0, stopped)

    def step(self, state: RunState, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on a batch; returns its loss. Raises TrainingError on NaN/inf."""
        device = self.device
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        v = batch["valid"].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
            logits = state.net(x)
        y, v = coarse_targets(y, v, self.spec.output_stride)
        loss = self.loss_fn(logits.float(), y, v)
        if not torch.isfinite(loss):
            kept = (
                f"the best checkpoint is kept at {self.best_path}"
                if self.best_path.exists()
                else "no checkpoint was saved yet"
            )
            raise TrainingError(
                f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step + 1}; "
                f"{kept}. Lower --lr, raise --warmup-steps, or try --loss bce"
            )
        state.opt.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            state.scaler.unscale_(state.opt)
            nn.utils.clip_grad_norm_(state.model.parameters(), self.cfg.grad_clip)
        state.scaler.step(state.opt)
        state.scaler.update()
        state.sched.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        state.step += 1
        return float(loss.item())

    # -------------------------------------------------------------------------- validate

    def validate(self, state: RunState) -> ValScore | None:
        """Score the eval weights on the held-out region: F0.5 over its pixels, threshold searched.

        Regions and fragment: each held-out block (with a margin of context) or the held-out
        fragment is predicted on a grid with Gaussian blending, as ``inkpipe predict`` does,
        and scored inside its mask. Patches: each held-out window is predicted whole (they do
        not overlap).
        """
        cfg, plan = self.cfg, self.plan
        predict = make_predictor(state.eval_model, self.device)
        if plan.val_fragment is not None:
            frag = plan.fragments[plan.val_fragment]
            norm = normalizer_for(frag.layer_stats(), cfg.layers, cfg.normalize)
            view = VolumeView(frag.volume, cfg.layers, norm, cfg.cache_mb / 2)
            mask = frag.mask()
            h, w = mask.shape
            stride = cfg.val_stride_px or plan.tile_px // 2
            spill = self.out / ".val_canvas" if h * w > 32e6 else None
            prob = sliding_window_predict(
                view, predict, plan.tile_px, stride, self.batch_size, valid=mask, out_dir=spill
            )
            best_t, best_f, table = search_threshold(prob, frag.labels(), valid=mask)
        elif plan.val_regions:
            probs, truths = [], []
            views: dict[int, VolumeView] = {}
            for r in plan.val_regions:
                if r.fragment not in views:
                    frag = plan.fragments[r.fragment]
                    norm = normalizer_for(frag.layer_stats(), cfg.layers, cfg.normalize)
                    views[r.fragment] = VolumeView(frag.volume, cfg.layers, norm, cfg.cache_mb / 2)
                h, w = r.valid.shape
                prob = sliding_window_predict(
                    RegionView(views[r.fragment], r.y0, r.x0, h, w),
                    predict,
                    plan.tile_px,
                    plan.tile_px // 2,
                    self.batch_size,
                    valid=r.valid,
                )
                probs.append(prob[r.valid])
                truths.append(r.truth[r.valid])
            best_t, best_f, table = search_threshold(np.concatenate(probs), np.concatenate(truths))
        elif len(plan.val_windows):
            probs, truths, valids = [], [], []
            for i in range(0, len(plan.val_windows), self.batch_size):
                keys = [tuple(k) for k in plan.val_windows[i : i + self.batch_size].tolist()]
                items = self.dataset.batch(keys, augment=False)
                probs.append(predict(np.stack([it["image"].numpy() for it in items])))
                truths.append(np.stack([it["label"][0].numpy() for it in items]))
                valids.append(np.stack([it["valid"][0].numpy() for it in items]))
            best_t, best_f, table = search_threshold(
                np.concatenate(probs), np.concatenate(truths) > 0, valid=np.concatenate(valids) > 0
            )
        else:
            return None
        row = next(r for r in table if r.threshold == best_t)
        return ValScore(best_f, row.precision, row.recall, best_t)

    # -------------------------------------------------------------------------- end of epoch

    def end_epoch(self, state: RunState, stats: EpochStats, score: ValScore | None) -> None:
        """Record the epoch: history row, best and last checkpoints, metrics files, log line."""
        row = {
            "epoch": state.epoch + 1,
            "steps": state.step,
            "train_loss": round(stats.loss, 6),
            "val_f05": "" if score is None else round(score.f05, 6),
            "val_precision": "" if score is None else round(score.precision, 6),
            "val_recall": "" if score is None else round(score.recall, 6),
            "threshold": "" if score is None else score.threshold,
            "lr": state.opt.param_groups[0]["lr"],
            "seconds": round(stats.seconds, 2),
            "crops_per_s": round(stats.crops * self.d.world_size / max(stats.seconds, 1e-9), 1),
        }
        state.history.append(row)
        if self.d.main:
            self.save(state, score)
            write_metrics(self.out / "metrics.csv", state.history)
            if self.board is not None:
                self.board.write(row)
            plot_metrics(self.out / "metrics.png", state.history)
            val_text = (
                ""
                if score is None
                else (
                    f", val F0.5 {score.f05:.3f} (P {score.precision:.3f}, "
                    f"R {score.recall:.3f}) at threshold {score.threshold:.2f}"
                )
            )
            self.log(
                f"epoch {state.epoch + 1}{self.of_epochs}: loss {row['train_loss']:.4f}"
                f"{val_text}, {row['crops_per_s']:.0f} crops/s, {row['seconds']:.0f} s"
            )
        state.epoch += 1

    def save(self, state: RunState, score: ValScore | None) -> None:
        """Write ``best.pt`` if this epoch is the best so far, and ``last.pt`` always."""
        f05 = score.f05 if score is not None else -state.history[-1]["train_loss"]
        threshold = score.threshold if score is not None else 0.5
        keys = ("epoch", "steps", "train_loss", "val_f05", "val_precision", "val_recall")
        metrics = {k: state.history[-1][k] for k in keys}

        def payload(**extra: Any) -> dict[str, Any]:
            return checkpoint_payload(
                state.eval_model,
                self.spec,
                self.cfg.layers,
                self.plan.tile_px,
                threshold,
                metrics,
                self.cfg.to_dict(),
                epoch=state.epoch,
                step=state.step,
                **extra,
            )

        if f05 > state.best.f05:
            state.best = Best(f05, threshold, state.epoch + 1)
            save_checkpoint(self.best_path, payload())
        ema_extra: dict[str, Any] = {}
        if state.ema is not None:
            raw = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
            ema_extra = {"train_state_dict": raw, "ema_updates": int(state.ema.n_averaged)}
        save_checkpoint(
            self.last_path,
            payload(
                optimizer=state.opt.state_dict(),
                scheduler=state.sched.state_dict(),
                scaler=state.scaler.state_dict(),
                history=state.history,
                best_f05=state.best.f05,
                best_threshold=state.best.threshold,
                best_epoch=state.best.epoch,
                rng=capture_rng(self.dataset.augment, self.loader.generator),
                **ema_extra,
            ),
        )

    # -------------------------------------------------------------------------- the run

    def start(self, state: RunState) -> None:
        """Resume or refuse to overwrite, write ``config.yaml`` and log what is trained."""
        cfg, plan = self.cfg, self.plan
        if cfg.resume:
            if not self.last_path.is_file():
                raise ConfigError(
                    f"--resume: no {self.last_path} to resume from; drop --resume to start afresh"
                )
            self.resume(state)
        elif self.d.main and self.last_path.exists():
            raise ConfigError(
                f"{self.out} already holds a run (last.pt); pass --resume to continue it or "
                "choose another --out"
            )
        if self.d.main:
            if cfg.tensorboard:
                self.board = TensorBoardLog(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            trained = [f.id for i, f in enumerate(plan.fragments) if i != plan.val_fragment]
            self.log(describe(cfg, self.device))
            self.log(
                f"training {self.spec.name} ({count_parameters(state.model) / 1e6:.2f} M "
                f"parameters) on {', '.join(trained)}, device {self.device}, validation "
                f"{cfg.val}" + val_extent(plan, cfg.val.kind)
            )
        barrier(self.d)

    def run(self) -> TrainResult:
        """Train until ``epochs`` are done or the time budget is spent; return the result."""
        state = self.build()
        self.start(state)
        while state.epoch < self.epochs:
            stats = self.train_epoch(state)
            score = self.validate(state) if self.d.main else None
            self.end_epoch(state, stats, score)
            barrier(self.d)
            if stats.out_of_time:
                self.log(
                    f"stopped in epoch {state.epoch} after {state.step} steps: the "
                    f"--max-minutes {self.cfg.max_minutes:g} are spent"
                )
                break
        if self.board is not None:
            self.board.close()
        best = state.best
        if self.d.main:
            self.log(
                f"best val F0.5 {max(best.f05, 0):.3f} at epoch {best.epoch} "
                f"(threshold {best.threshold:.2f}): {self.best_path}"
            )
        return TrainResult(
            self.out,
            max(best.f05, 0.0),
            best.threshold,
            best.epoch,
            len(state.history),
            self.best_path,
            self.last_path,
        )


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
                val=Validation(ValidationKind.FRAGMENT, 0, fid),
            )
            results.extend(train(fold, log))
        return results
    return [train_one(cfg, log)]


def val_extent(plan: Plan, kind: str) -> str:
    """Say how much is held out, e.g. `` (12 blocks, 0.9 Mpx of papyrus, 8.1 % ink)``."""
    if plan.val_regions:
        px = sum(int(r.valid.sum()) for r in plan.val_regions)
        ink = sum(int((r.truth & r.valid).sum()) for r in plan.val_regions)
        return (
            f" ({len(plan.val_regions)} blocks, {px / 1e6:.2f} Mpx of papyrus, "
            f"{ink / max(px, 1):.1%} ink)"
        )
    if len(plan.val_windows):
        small = "fragments too small for regions: " if kind == "regions" else ""
        return f" ({small}{len(plan.val_windows)} windows)"
    return ""


def seed_everything(seed: int) -> None:
    """Seed torch and NumPy's global generators (the samplers have their own)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train_one(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train one model as configured; see the module docstring."""
    device = select_device(cfg.device)
    cfg = resolve(cfg, device)
    plan = plan_run(cfg)
    retain_freed_memory()  # crops are allocated and freed thousands of times a second
    with distributed(device) as d:
        seed_everything(cfg.seed + d.rank)
        trainer = Trainer(cfg, plan, device, d, log if d.main else (lambda s: None))
        return _run_locked(trainer, cfg, d.main, log)


def run_lock_path(out: Path) -> Path:
    """Return the lock file of a run folder being trained into."""
    return Path(out) / "train.lock"


def _run_locked(trainer: Trainer, cfg: TrainConfig, main: bool, log: Callable) -> TrainResult:
    """Run ``trainer`` holding the run folder's lock (rank 0); a full disk is one line."""
    fix = "free some space, then continue with --resume (the checkpoints already written are kept)"
    with disk_full_as_error(cfg.out, f"the run {cfg.out}", fix):
        if not main:
            return trainer.run()
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        with hold_lock(run_lock_path(cfg.out), f"run {cfg.out}", "inkpipe train", log):
            return trainer.run()
