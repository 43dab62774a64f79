"""--device (and, where onnxruntime judges, --providers): where the mirror's attacks,
alphas and loss curves run, and the execution providers the verdicts run on."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, Parsed
from gdws_deploy.runtime.providers import parse_device, parse_providers

if TYPE_CHECKING:
    import torch

PROVIDERS = Parsed(parse_providers, "P[,P...]")


def _device(text: str, flag: str) -> str:
    """The --device spec as given, once it parses (resolved when the verb runs)."""
    parse_device(text, flag)
    return text


DEVICE = Parsed(_device, "auto|cpu|cuda[:N]")


class DeviceArgs(ArgGroup):
    """Builds the torch.device; `providers` reads --providers (verbs with onnxruntime
    verdicts declare it: `providers=True`)."""

    def __init__(
        self,
        providers: bool = False,
        device_help: str = "Where attacks, alphas and loss curves run, and --tune ort: auto "
        "(CUDA when torch sees a GPU), cpu, cuda or cuda:N.",
    ) -> None:
        device = click.option(
            "--device",
            default="auto",
            show_default=True,
            type=DEVICE,
            metavar="auto|cpu|cuda[:N]",
            help=device_help,
        )
        listed = click.option(
            "--providers",
            type=PROVIDERS,
            help="onnxruntime execution providers, in order: trt, cuda, cpu "
            "or onnxruntime's names [default: TensorRT's and CUDA's (those this onnxruntime "
            "has) on a CUDA --device, then the CPU].",
        )
        self.options = (device, listed) if providers else (device,)

    @staticmethod
    def build(flags: Flags) -> torch.device:
        """The --device on this machine (a GdwsError for cuda where torch sees no GPU)."""
        from gdws_deploy.robustness.device import resolve_device

        return resolve_device(flags["device"])

    @staticmethod
    def providers(flags: Flags) -> Optional[List[str]]:
        """The --providers asked for; None: chosen from the device."""
        return flags.get("providers")
