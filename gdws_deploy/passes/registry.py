"""Compression passes by name: what ConvertOptions.method and --method choose from.

GDWS, grouped kernel pruning (GKP), ATMC's low-rank factorization and INT8 alone (which
also follows any pass: ConvertOptions.int8). A dict, not a plugin system: the passes
ship with the package.
"""

from __future__ import annotations

from typing import Dict

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.atmc.compression import AtmcPass
from gdws_deploy.passes.base import CompressionPass
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gkp.compression import GkpPass
from gdws_deploy.passes.int8.compression import Int8Pass

PASSES: Dict[str, CompressionPass] = {
    GdwsPass.name: GdwsPass(),
    GkpPass.name: GkpPass(),
    AtmcPass.name: AtmcPass(),
    Int8Pass.name: Int8Pass(),
}


def pass_named(name: str) -> CompressionPass:
    """The pass registered as `name`; GdwsError naming the choices otherwise."""
    if name not in PASSES:
        raise GdwsError(f"unknown method {name!r} (choose from {', '.join(PASSES)})")
    return PASSES[name]
