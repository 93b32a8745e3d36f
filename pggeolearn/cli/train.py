"""``pggeolearn train`` and ``pggeolearn model list|show|drop|export|import``.

mxnet/torch are imported only when a command runs (inside pggeolearn.training), never here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx
from pggeolearn.db import connect


@click.command("train")
@click.argument("dataset")
@click.option("--model", "model_name", required=True, metavar="NAME",
              help="Name to store the model under in pggeolearn.models.")
@click.option("--framework", type=click.Choice(["mxnet", "torch"]), default=None,
              help="Deep learning framework [mxnet].")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True,
              help="Epochs in all (with --resume: including those already done).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Chips per batch [8].")
@click.option("--lr", type=float, default=None, help="Peak learning rate (Adam) [1e-3].")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default=None,
              help="Learning-rate schedule [cosine].")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|gpu|gpu:N",
              help="auto uses every GPU there is (MXNet: data parallel), else the CPU.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Seeds initialization, shuffling and augmentation [0].")
@click.option("--resume", is_flag=True,
              help="Continue the model's last checkpoint (its settings; --epochs is the new total).")
@click.option("--width", type=click.IntRange(2, 512), default=None,
              help="Channels of the first U-Net level, doubled at each level [16].")
@click.option("--depth", type=click.IntRange(1, 6), default=None, help="U-Net poolings [3].")
@click.option("--stem-stride", type=click.Choice(["1", "2", "4"]), default=None,
              help="2 or 4 runs the encoder at 1/2 or 1/4 resolution (much cheaper; labels stay full size) [2].")
@click.option("--block", type=click.Choice(["plain", "residual"]), default=None,
              help="U-Net levels of two convolutions, or with a residual shortcut [plain].")
@click.option("--head", type=click.Choice(["refine", "bilinear"]), default=None,
              help="After a stem: a full-resolution conv over the upsampled features and the "
                   "input, or logits upsampled bilinearly [refine].")
@click.option("--loss", type=click.Choice(["ce", "ce+dice"]), default=None,
              help="Cross entropy, or cross entropy plus soft Dice (closer to IoU) [ce].")
@click.option("--jitter", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Colour jitter with --augment: band gain 1±J and brightness ±J std [0].")
@click.option("--class-weights/--no-class-weights", default=None,
              help="Weigh the loss by inverse train class frequency (clipped) [on].")
@click.option("--augment/--no-augment", default=None, help="Random flips and 90° rotations (and --jitter) [on].")
@click.option("--patience", type=click.IntRange(0), default=None,
              help="Stop after this many epochs without a better val mIoU (0: never) "
                   "[5 with --schedule constant; never with cosine/step or --time-limit, "
                   "which anneal to their end].")
@click.option("--time-limit", "time_limit", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MIN", help="A budget: the LR schedule anneals by then, and training stops "
                                  "before an epoch that would not fit (the report says why it stopped).")
@click.option("--overwrite", is_flag=True, help="Replace a model of the same name.")
@click.option("--force", is_flag=True,
              help="With --resume: continue on another dataset or a changed recipe.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write loss and IoU curves per epoch to this PNG.")
@click.option("--sampling", metavar="SQL", default=None,
              help="SQL returning (tile_id, weight) over the chip store: each epoch draws train "
                   "chips by weight, e.g. hard examples from pggeolearn.chip_scores.")
@click.option("--read-dsn", "read_dsns", multiple=True, metavar="DSN",
              help="Stream chips from this server (repeat: a primary and its read replicas; "
                   "checkpoints and the model still go to --dsn).")
@click.option("--score-chips", is_flag=True,
              help="After training, store every train chip's loss and IoU in "
                   "pggeolearn.chip_scores (for hard-example --sampling next time).")
@click.option("--nproc", type=int, default=1, show_default=True, metavar="N",
              help="Train data-parallel in N processes on this machine (torch: DDP, gloo on CPU, "
                   "NCCL on GPUs; mxnet: a dist_sync kvstore), each streaming its own shard; "
                   "rank 0 writes checkpoints and the model. With GPUs: one per process.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@pass_ctx
def train(ctx: Context, dataset: str, model_name: str, framework, epochs, batch_size, lr, schedule,
          device, seed, resume, width, depth, stem_stride, block, head, loss, jitter, class_weights, augment, patience,
          time_limit, overwrite, force, plot, sampling, read_dsns, score_chips, nproc, progress) -> None:
    """Train a U-Net on DATASET's train split straight from the database, validate it on the
    spatially held-out val split every epoch, and store the best epoch as model NAME.

    Ctrl-C stops at once and keeps a resumable checkpoint (pggeolearn.runs)."""
    from pggeolearn.training import train as run_training

    if plot is not None:
        from pggeolearn.training.plot import require_matplotlib

        require_matplotlib()  # now, not after the training
    report = run_training(
        ctx.dsn, dataset, model_name, framework=framework, epochs=epochs, batch_size=batch_size,
        lr=lr, schedule=schedule, device=device, seed=seed, resume=resume, width=width,
        depth=depth, stem_stride=int(stem_stride) if stem_stride else None, block=block, head=head,
        loss=loss, jitter=jitter, class_weights=class_weights, augment=augment, patience=patience,
        time_limit_min=time_limit, overwrite=overwrite, force=force, plot=plot, progress=progress,
        sampling=sampling, read_dsns=tuple(read_dsns), score_chips=score_chips, nproc=nproc)
    click.echo(str(report))
    if report.interrupted:
        sys.exit(130)


@click.group("model")
def model() -> None:
    """The model registry (pggeolearn.models): list, show, drop, export, import."""


@model.command("list")
@pass_ctx
def list_(ctx: Context) -> None:
    """List the stored models."""
    from pggeolearn.training import registry

    with connect(ctx.dsn, autocommit=True) as conn:
        found = registry.list_models(conn)
    if not found:
        click.echo("no models (train one: pggeolearn train --help)")
    for m in found:
        best = (m.metrics or {}).get("best") or {}
        miou = best.get("miou")
        click.echo(f"{m.name}\t{m.framework}\t{m.dataset}\t{m.tile_px}px\t"
                   f"val mIoU {'-' if miou is None else f'{miou:.3f}'}\t"
                   f"{m.created_at:%Y-%m-%d %H:%M}")


@model.command("show")
@click.argument("name")
@pass_ctx
def show(ctx: Context, name: str) -> None:
    """Describe model NAME: architecture, classes, input grid, training, metrics, and its
    lineage (source tables -> dataset version and recipe -> chips -> model -> runs)."""
    from pggeolearn import lineage
    from pggeolearn.training import registry

    with connect(ctx.dsn, autocommit=True) as conn:
        click.echo(registry.get(conn, name, weights=False).describe())
        click.echo("\n".join(lineage.model_lineage(conn, name)))


@model.command("drop")
@click.argument("name")
@pass_ctx
def drop(ctx: Context, name: str) -> None:
    """Delete model NAME (and its training checkpoints)."""
    from pggeolearn.training import registry

    with connect(ctx.dsn, autocommit=True) as conn:
        registry.drop(conn, name)
    click.echo(f"dropped model {name}")


@model.command("export")
@click.argument("name")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write (a zip: model.json + the weights).")
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
@pass_ctx
def export(ctx: Context, name: str, out: Path, overwrite: bool) -> None:
    """Write model NAME to a self-contained file that `model import` (or
    pggeolearn.training.registry.load_file) reads anywhere."""
    from pggeolearn.training import registry

    with connect(ctx.dsn, autocommit=True) as conn:
        path = registry.export(conn, name, out, overwrite=overwrite)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@model.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Store it under this name [the file's].")
@click.option("--overwrite", is_flag=True, help="Replace a model of the same name.")
@pass_ctx
def import_(ctx: Context, path: Path, name: str | None, overwrite: bool) -> None:
    """Store an exported model file in this database's registry."""
    from pggeolearn.training import registry

    with connect(ctx.dsn, autocommit=True) as conn:
        rec = registry.import_file(conn, path, name=name, overwrite=overwrite)
    click.echo(f"imported model {rec.name} ({rec.framework}, dataset {rec.dataset})")


commands = [train, model]
