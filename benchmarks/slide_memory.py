"""Peak resident memory while processing a 40,000 x 40,000 px synthetic slide block by block.

The slide (pyramidal OME-TIFF, 0.243 µm/px, mostly glass with a few tissue-like regions) is
generated lazily tile by tile, then processed in a fresh child process (so its peak RSS is the
processing alone, torch included): tissue detection at a low level, tissue blocks only through
the network, three pyramidal OME-TIFF outputs.

Usage::

    .venv/bin/python benchmarks/slide_memory.py --work /tmp/uga_slide --side 40000 --samples 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(args: argparse.Namespace) -> None:
    """Process the slide in this process and print a JSON line with timings and peak RSS."""
    import torch

    from napari_uga.models import DEFAULT_WEIGHTS, ModelConfig, UNet, load_model
    from napari_uga.slides import process_slide

    torch.set_num_threads(args.threads)
    if DEFAULT_WEIGHTS.is_file():
        model = load_model(DEFAULT_WEIGHTS, "auto")
    else:
        torch.manual_seed(0)
        model = UNet(ModelConfig()).eval()
    peak = [0.0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.perf_counter()
    summary = process_slide(model, args.slide, args.out, samples=args.samples, block=args.block)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**summary, "seconds": seconds, "peak_rss_mb_polled": peak[0], "ru_maxrss_mb": maxrss}))


def main() -> None:
    """Write the slide if needed, process it in a child process, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/uga_slide"))
    parser.add_argument("--side", type=int, default=40000)
    parser.add_argument("--tissue", type=float, default=0.01, help="tissue fraction of the slide")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from napari_uga.slides import write_synthetic_slide

    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"synthetic_{args.side}.ome.tif"
    if not slide.is_file():
        start = time.perf_counter()
        write_synthetic_slide(slide, (args.side, args.side), n_regions=5, tissue_fraction=args.tissue, seed=0)
        print(f"wrote {slide} ({slide.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    command = [sys.executable, __file__, "--child", "--slide", str(slide), "--out", str(args.work / "out"),
               "--samples", str(args.samples), "--block", str(args.block), "--threads", str(args.threads)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    sizes = {k: Path(v).stat().st_size / 1e6 for k, v in figures["outputs"].items()}
    print(f"slide {args.side} x {args.side} px level 0, {args.tissue:.0%} tissue, T={args.samples}, block {args.block}")
    print(f"working level {figures['level']} -> {figures['working_shape']} px at {figures['working_mpp']} µm/px")
    print(f"blocks run {figures['blocks_run']} of {figures['blocks_total']} (the rest are glass)")
    print(f"time {figures['seconds']:.1f} s, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"peak RSS {figures['ru_maxrss_mb']:.0f} MB (ru_maxrss; polled {figures['peak_rss_mb_polled']:.0f} MB)")
    print("outputs (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
