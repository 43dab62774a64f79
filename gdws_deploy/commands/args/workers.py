"""--workers, --ray-address (and for eval --resume): the samples of an evaluation sharded
across processes or machines on Ray, and a checkpoint of finished shards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags

if TYPE_CHECKING:
    from gdws_deploy.robustness.shards import Sharding


class WorkersArgs(ArgGroup):
    """Builds the Sharding (None: one process, as without these flags); `resume=True`
    declares --resume as well."""

    def __init__(self, resume: bool = False) -> None:
        self.options = (
            click.option(
                "--workers",
                type=click.IntRange(min=1),
                metavar="N",
                help="Shard the samples over N local Ray workers (pip install "
                "gdws-deploy[ray]); the verdicts are the same as in one process.",
            ),
            click.option(
                "--ray-address",
                metavar="ADDR",
                help="Join the Ray cluster at ADDR ('auto': the one this machine is part of) "
                "and shard the samples over its workers.",
            ),
            *(
                (
                    click.option(
                        "--resume",
                        type=click.Path(path_type=Path),
                        metavar="FILE",
                        help="Checkpoint each finished shard to FILE (JSON, atomic); a rerun "
                        "with the same FILE skips the shards it holds.",
                    ),
                )
                if resume
                else ()
            ),
        )

    @staticmethod
    def build(flags: Flags) -> Optional[Sharding]:
        from gdws_deploy.robustness.shards import Sharding

        workers, address = flags["workers"], flags["ray_address"]
        resume: Optional[Path] = flags.get("resume")
        if workers is None and address is None and resume is None:
            return None
        return Sharding(workers=workers or 0, address=address, resume=resume)
