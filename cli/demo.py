"""``inkpipe demo``: the whole job on built-in synthetic data, on CPU, in a few minutes.

Synthesize training and test fragments, ingest them, train the small Attention-UNet for a
time budget, predict the test fragment, score it against its hidden truth, and print F0.5
with the paths of the pictures. A recipe above the three stages: it calls the same public
functions as the individual commands (``synthesize``, ``ingest``, ``train``, ``predict``,
``evaluate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from inkpipe.infer.evaluate import EvaluateConfig, EvaluationReport, evaluate
from inkpipe.infer.predict import FragmentPrediction, PredictConfig, predict
from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import StoreSettings
from inkpipe.pipeline.synth import SynthConfig, synthesize
from inkpipe.train.checkpoint import DEVICES
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.loop import train

from .options import default_of


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults take about six minutes on a 2-core CPU.

    Training uses the device's recipe (:mod:`inkpipe.train.recipe`), exactly what
    ``inkpipe train`` does with no model options; only the layers, the time budget and the
    number of held-out patches are the demo's own.

    Attributes:
        workdir: folder for everything the demo writes (fragments, store, run, prediction).
        height_px, width_px: size of each synthetic fragment.
        n_train: training fragments; one test fragment is always made.
        layers: CT layers the model reads (the synthetic ink lies in 24..36).
        tile_px: window size of the store's index (the recipe's CPU tile).
        ink_contrast: synthetic ink strength in noise standard deviations; stronger than the
            default 0.8 so minutes of CPU training find it (still invisible per pixel).
        minutes: training time budget.
        seed: seeds synthesis and training.
        device: auto/cpu/cuda.
    """

    workdir: Path = Path("inkpipe-demo")
    height_px: int = 512
    width_px: int = 384
    n_train: int = 2
    layers: LayerRange = LayerRange(22, 40)
    tile_px: int = 64
    ink_contrast: float = 1.2
    minutes: float = 5.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced."""

    report: EvaluationReport
    predictions: list[FragmentPrediction]
    submission: Path
    checkpoint: Path
    seconds: float


def demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run synthesize -> ingest -> train -> predict -> evaluate in ``cfg.workdir``."""
    t0 = time.perf_counter()
    work = Path(cfg.workdir)
    data, store, run, pred = (
        work / "fragments",
        work / "store.zarr",
        work / "run",
        work / "prediction",
    )
    log(
        f"1/5 synthesizing {cfg.n_train} training + 1 test fragment "
        f"({cfg.height_px}x{cfg.width_px}x65) in {data}"
    )
    frags = synthesize(
        SynthConfig(
            out=data,
            n_train=cfg.n_train,
            n_test=1,
            height_px=cfg.height_px,
            width_px=cfg.width_px,
            seed=cfg.seed,
            ink_contrast=cfg.ink_contrast,
        ),
        progress=cfg.progress,
    )
    test_ids = tuple(f.id for f in frags if f.split == "test")
    log(f"2/5 ingesting into {store}")
    ingest(
        IngestConfig(
            root=data,
            out=store,
            progress=cfg.progress,
            settings=StoreSettings(tile_px=cfg.tile_px, stride_px=cfg.tile_px // 2),
        ),
        log=log,
    )
    log(f"3/5 training on layers {cfg.layers} for up to {cfg.minutes:g} min in {run}")
    (result,) = train(
        TrainConfig(
            store=store,
            out=run,
            layers=cfg.layers,
            val=parse_validation("patches:24"),
            seed=cfg.seed,
            device=cfg.device,
            max_minutes=cfg.minutes,
            progress=cfg.progress,
            resume=(run / "last.pt").exists(),
        ),
        log=log,
    )
    log(f"4/5 predicting test fragment(s) {', '.join(test_ids)} into {pred}")
    predictions = predict(
        PredictConfig(
            checkpoints=(result.best_path,),
            fragments=test_ids,
            out=pred,
            store=store,
            tta="flips",
            device=cfg.device,
            progress=cfg.progress,
        ),
        log=log,
    )
    submission = pred / "submission.csv"
    log("5/5 scoring against the hidden truth")
    report = evaluate(EvaluateConfig(submission=submission, labels=data / "truth"))
    return DemoResult(report, predictions, submission, result.best_path, time.perf_counter() - t0)


@click.command(
    "demo", short_help="Synthesize data, ingest, train, predict and score: the whole job on CPU."
)
@click.option(
    "--workdir",
    default=default_of(DemoConfig, "workdir"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for everything the demo writes.",
)
@click.option(
    "--minutes",
    type=float,
    default=default_of(DemoConfig, "minutes"),
    show_default=True,
    help="Training time budget.",
)
@click.option(
    "--size",
    default=f"{default_of(DemoConfig, 'height_px')}x{default_of(DemoConfig, 'width_px')}",
    show_default=True,
    help="Fragment size HxW.",
)
@click.option("--seed", type=int, default=default_of(DemoConfig, "seed"), show_default=True)
@click.option(
    "--device",
    default=default_of(DemoConfig, "device"),
    show_default=True,
    type=click.Choice(DEVICES),
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(
    workdir: Path, minutes: float, size: str, seed: int, device: str, quiet: bool
) -> None:
    """Run the whole job on synthetic data: synth, ingest, train, predict, evaluate.

    Re-running reuses what is already done (fragments, store) and continues training.
    """
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"expected --size HxW like 512x384, got '{size}'") from None
    res = demo(
        DemoConfig(
            workdir=workdir,
            height_px=height,
            width_px=width,
            minutes=minutes,
            seed=seed,
            device=device,
            progress=not quiet,
        ),
        log=click.echo,
    )
    click.echo("")
    click.echo(res.report.to_table())
    click.echo("")
    for p in res.predictions:
        click.echo(f"fragment {p.id}: overlay {p.overlay_png}")
        click.echo(f"             probability {p.probability_png}, mask {p.mask_png}")
    click.echo(f"submission {res.submission}; checkpoint {res.checkpoint}")
    click.echo(f"demo F0.5 = {res.report.mean_fbeta:.3f} in {res.seconds / 60:.1f} min")
