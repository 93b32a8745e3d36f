"""``pggeolearn show-batch``: look at what a training loop will see."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx


@click.command("show-batch")
@click.argument("dataset")
@click.option("--split", default="train", show_default=True,
              type=click.Choice(["train", "val", "test", "excluded", "all"]),
              help="Which chips to draw from.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("batch.png"),
              show_default=True, help="PNG file to write.")
@click.option("--augment", is_flag=True, help="Apply the training augmentation (flips, rotations).")
@click.option("--n", "n", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Chips in the batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle/augmentation seed.")
@click.option("--epoch", type=int, default=0, show_default=True, help="Epoch (changes the shuffle).")
@pass_ctx
def show_batch(ctx: Context, dataset: str, split: str, out: Path, augment: bool, n: int,
               seed: int, epoch: int) -> None:
    """Write one batch of DATASET as a PNG: chips with their labels over them in class colours."""
    from pggeolearn.pictures import show_batch as render

    click.echo(str(render(ctx.dsn, dataset, out=out, split=split, n=n, augment=augment,
                          seed=seed, epoch=epoch)))


commands = [show_batch]
