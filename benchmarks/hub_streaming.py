"""Hub streaming overlap: wall time of a hub run against download time + compute time, on a throttled hub.

    PYTHONPATH=.:tests python benchmarks/hub_streaming.py [--layers 4] [--scale 0.125] [--rate auto]

A synthetic Llama base and one full fine-tune (benchmarks/make_synthetic_llama.py, fp16, about one layer
per shard) are served by the loopback hub of the tests (tests/hubserver.py), throttled to `--rate` bytes per
second (auto: the rate at which downloading takes as long as computing, the case where overlap matters
most).  Three timings, each from a fresh hub cache and without the base-SVD cache:

- download: both repos fetched whole (snapshot_download, 2 files at a time), no analysis;
- compute:  `lorascale.compare` on the local directories, no download;
- streamed: `lorascale.compare("org/base", ["org/full-a"])`: downloads overlap the analysis.

overlap ratio = streamed / (download + compute): 1.0 means no overlap, max(download, compute) / (download
+ compute) is the best possible (0.5 when they are equal).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import make_synthetic_llama as synth
from common import command_line, machine, markdown_table, write_results


def _fresh_hub_env(root: Path, endpoint: str) -> None:
    cache = root / f"hf-{time.monotonic_ns()}"
    os.environ.update(HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"), HF_HUB_OFFLINE="0",
                      HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.125)
    parser.add_argument("--rate", default="auto", help="bytes per second, or auto")
    args = parser.parse_args()

    from huggingface_hub import snapshot_download
    from hubserver import HubServer

    from lorascale.api import compare  # the keyword API (request.build_request), as a notebook calls it

    with tempfile.TemporaryDirectory(prefix="lorascale-hub-bench-") as tmp:
        root = Path(tmp)
        layer_bytes = 2 * sum(synth.HIDDEN * synth.INTERMEDIATE if "mlp" in m else synth.HIDDEN ** 2
                              for m in synth.MODULES) * args.scale ** 2
        synth.SHARD_BYTES = int(layer_bytes)  # about one layer per shard
        paths = synth.build(root / "models", layers=args.layers, scale=args.scale, only=("full-a",))
        weights = sum(p.stat().st_size for d in (paths["base"], paths["full-a"]) for p in d.glob("*.safetensors"))

        started = time.perf_counter()
        compare(str(paths["base"]), [str(paths["full-a"])], root / "compute", device="cpu", use_cache=False)
        compute = time.perf_counter() - started

        rate = weights / compute if args.rate == "auto" else float(args.rate)
        server = HubServer(throttle=rate)
        server.add_directory("org/base", paths["base"])
        server.add_directory("org/full-a", paths["full-a"])
        endpoint = server.start()
        try:
            _fresh_hub_env(root, endpoint)
            started = time.perf_counter()
            for repo in ("org/base", "org/full-a"):
                snapshot_download(repo, cache_dir=os.environ["HF_HUB_CACHE"], endpoint=endpoint, max_workers=2)
            download = time.perf_counter() - started

            _fresh_hub_env(root, endpoint)
            started = time.perf_counter()
            compare("org/base", ["org/full-a"], root / "streamed", device="cpu", use_cache=False)
            streamed = time.perf_counter() - started
        finally:
            server.stop()

    ratio = streamed / (download + compute)
    best = max(download, compute) / (download + compute)
    rows = [[args.layers, args.scale, f"{weights / 2**20:.0f}", f"{rate / 2**20:.1f}", download, compute, streamed,
             ratio, best]]
    table = markdown_table(["layers", "scale", "weights MiB", "rate MiB/s", "download s", "compute s", "streamed s",
                            "overlap ratio", "best possible"], rows)
    print(table)
    write_results("hub_streaming", {"machine": machine(), "command": command_line(), "layers": args.layers,
                                    "scale": args.scale, "weights_bytes": weights, "rate": rate,
                                    "download_s": download, "compute_s": compute, "streamed_s": streamed,
                                    "overlap_ratio": ratio, "best_ratio": best}, table)


if __name__ == "__main__":
    main()
