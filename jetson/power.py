#!/usr/bin/env python3
"""Sample board power with jetson-stats (jtop) while a benchmark runs; report images/s per W.

    python3 jetson/power.py --bench-json out/bench.json --out out/power.json -- \
        gdws-deploy bench model.plan --json out/bench.json

The command runs while a thread reads jtop's total board power; afterwards the benchmark's
JSON gives images/s and the mean power turns it into images per second per watt (= images
per joule). Python 3.8, standard library plus jetson-stats; needs the jtop service running
(`sudo systemctl status jtop`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence


def total_power_mw(power: Any) -> Optional[float]:
    """Total board power in mW from jtop's `power` attribute.

    jetson-stats 4.x gives {'rail': {...}, 'tot': {'power': mW, ...}}; 3.x gave a
    (total, rails) pair whose total has 'cur' in mW. None when no total is reported.
    """
    total = power[0] if isinstance(power, (tuple, list)) and power else power
    if isinstance(total, dict) and "tot" in total:
        total = total["tot"]
    if not isinstance(total, dict):
        return None
    for key in ("power", "cur"):
        if isinstance(total.get(key), (int, float)):
            return float(total[key])
    return None


def power_summary(samples_mw: Sequence[float], seconds: float) -> Dict[str, float]:
    if not samples_mw:
        raise ValueError("jtop reported no power samples during the run")
    watts = [s / 1000.0 for s in samples_mw]
    return {
        "samples": len(watts),
        "seconds": seconds,
        "mean_power_w": sum(watts) / len(watts),
        "max_power_w": max(watts),
        "min_power_w": min(watts),
    }


def images_per_watt(bench: Dict[str, Any], mean_power_w: float) -> Dict[str, float]:
    """images/s from a `gdws-deploy bench --json` report (or its 'model' part) per watt."""
    report = bench["model"] if isinstance(bench.get("model"), dict) else bench
    rate = report.get("throughput_images_per_s") or report["throughput_qps"]
    return {"images_per_s": rate, "images_per_s_per_w": rate / mean_power_w}


class PowerSampler(threading.Thread):
    """Reads jtop's total power every `interval` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        from jtop import jtop

        self.jetson = jtop(interval=interval)
        self.samples: List[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.jetson as jetson:
            while not self.stopping.is_set() and jetson.ok():
                value = total_power_mw(jetson.power)
                if value is not None:
                    self.samples.append(value)

    def stop(self) -> List[float]:
        self.stopping.set()
        self.join()
        return self.samples


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-json", required=True, help="JSON the command writes")
    parser.add_argument("--out", required=True, help="where to write the power report")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    try:
        sampler = PowerSampler(args.interval)
    except ImportError:
        print("power.py: jetson-stats is missing: sudo pip3 install jetson-stats", file=sys.stderr)
        return 2
    sampler.start()
    started = time.monotonic()
    returncode = subprocess.call(command)
    seconds = time.monotonic() - started
    samples = sampler.stop()
    if returncode != 0:
        print(f"power.py: the benchmark failed with exit status {returncode}", file=sys.stderr)
        return returncode
    try:
        with open(args.bench_json) as handle:
            bench = json.load(handle)
        report = power_summary(samples, seconds)
    except (OSError, ValueError) as error:
        print(f"power.py: {error}", file=sys.stderr)
        return 2
    report.update(images_per_watt(bench, report["mean_power_w"]))
    report["command"] = command
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(
        f"power.py: {report['mean_power_w']:.2f} W mean over {report['samples']} samples, "
        f"{report['images_per_s']:.1f} images/s, {report['images_per_s_per_w']:.2f} images/s/W"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
