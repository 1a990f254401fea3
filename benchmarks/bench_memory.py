"""Benchmark: memory retrieval on the CPU, and memory extraction speed and peak memory.

    python benchmarks/bench_memory.py                      # writes reports/bench/memory.{json,md}
    python benchmarks/bench_memory.py --sizes 2000,8000    # quicker extraction check

Retrieval: 512 queries against 58,701 memory entries (Sim10k's object count), 1024-d, top-1 and top-10,
with one class (Sim10k) and with three; median of several runs after a warm-up.

Extraction: the detector of params.yaml's ``model`` section and scenario (by default the ``small``
backbone at 160/320 resizing, untrained: speed and memory do not depend on the weights), 320x160 images
like the default benchmark's, on a generated dataset with 40 objects per image, at two sizes (default 15,000 and 60,000 foreground entries).
Each size runs in its own process; its peak memory is the peak resident set size during extraction minus
the resident size just before it (the kernel's high-water mark is reset first), so it shows whether memory
grows with the number of entries.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer

from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank
from vspa.utils import write_json_atomic, write_text_atomic

app = typer.Typer(add_completion=False)

CLASSES = ["car", "person", "truck"]


class ManyObjects(torch.utils.data.Dataset):
    """Images made on the fly (nothing is held): noise plus a grid of rectangles, one object each."""

    class_names = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, images: int, height: int = 160, width: int = 320, rows: int = 5, cols: int = 8):
        self.images, self.height, self.width, self.rows, self.cols = images, height, width, rows, cols

    def __len__(self):
        return self.images

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = 0.3 * torch.rand(3, self.height, self.width, generator=g)
        cell_h, cell_w = self.height / self.rows, self.width / self.cols
        boxes = []
        for r in range(self.rows):
            for c in range(self.cols):
                x1, y1 = c * cell_w + 2, r * cell_h + 2
                boxes.append([x1, y1, x1 + cell_w - 6, y1 + cell_h - 6])
                image[:, int(y1) : int(y1 + cell_h - 6), int(x1) : int(x1 + cell_w - 6)] += 0.5
        n = len(boxes)
        return image.clamp(0, 1), {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.randint(1, len(CLASSES) + 1, (n,), generator=g),
            "image_id": i,
            "object_ids": torch.arange(i * n, (i + 1) * n),
            "index": i,
        }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@app.command()
def worker(
    images: int = typer.Option(...),
    out: Path = typer.Option(...),
    batch_size: int = typer.Option(8),
    chunk_rows: int = typer.Option(4096),
    threads: int = typer.Option(1),
    params: str = typer.Option("params.yaml", help="Params file whose model section (and scenario) is used."),
) -> None:
    """One extraction run (used by ``run``): prints a JSON line with speed and memory."""
    from vspa.config import stage_config
    from vspa.detection.model import DetectorConfig, build_detector
    from vspa.memory.extract import extract_memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = DetectorConfig.from_params(stage_config(params, "model")["model"])  # the scenario's detector
    detector = build_detector(cfg, len(CLASSES)).eval()
    dataset = ManyObjects(images)
    extract_memory(detector, ManyObjects(2), out, batch_size=batch_size, progress=False)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (VmHWM)
    before = _status_kb("VmRSS")
    stats = extract_memory(detector, dataset, out, batch_size=batch_size, chunk_rows=chunk_rows, progress=False)
    peak = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                **stats.to_dict(),
                "rss_before_mib": before / 1024,
                "peak_rss_mib": peak / 1024,
                "peak_growth_mib": (peak - before) / 1024,
                "file_mib": out.stat().st_size / 2**20,
            }
        )
    )


def bench_retrieval(n: int, dim: int, queries: int, classes: int, k: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(classes)
    labels = np.arange(n) % classes + 1
    bank = MemoryBank(
        fg_features=torch.randn(n, dim, generator=g).numpy(),
        fg_labels=labels,
        fg_image_ids=np.arange(n),
        fg_object_ids=np.arange(n),
        fg_boxes=np.zeros((n, 4), np.float32),
        bg_features=torch.randn(max(1, n // 10), dim, generator=g).numpy(),
        bg_image_ids=np.arange(max(1, n // 10)),
        attrs={"class_names": CLASSES[:classes]},
    )
    t = time.perf_counter()
    retriever = Retriever(bank, "cpu")
    setup = time.perf_counter() - t
    q = torch.randn(queries, dim, generator=g)
    ql = torch.randint(1, classes + 1, (queries,), generator=g)
    retriever.topk(q, ql, k)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        retriever.topk(q, ql, k)
        times.append(time.perf_counter() - t)
    return {
        "entries": n,
        "classes": classes,
        "queries": queries,
        "k": k,
        "setup_s": setup,
        "median_s": statistics.median(times),
        "min_s": min(times),
    }


@app.command()
def run(
    entries: int = typer.Option(58701, help="Memory entries for the retrieval benchmark."),
    queries: int = typer.Option(512),
    repeats: int = typer.Option(5),
    sizes: str = typer.Option("15000,60000", help="Foreground entries of the extraction runs (40 per image)."),
    threads: int = typer.Option(1, help="torch threads."),
    out_dir: Path = typer.Option(Path("reports/bench")),
) -> None:
    """Retrieval and extraction benchmarks; writes memory.json and memory.md to ``out_dir``."""
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    retrieval = [bench_retrieval(entries, 1024, queries, classes, k, repeats) for classes in (1, 3) for k in (1, 10)]
    for r in retrieval:
        typer.echo(f"retrieval {r['classes']} class(es), k={r['k']}: {r['median_s'] * 1e3:.1f} ms")

    extraction = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for fg in [int(s) for s in sizes.split(",")]:
        images = -(-fg // 40)
        tmp = out_dir / f".bench_memory_{images}.h5"
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "worker",
                    "--images",
                    str(images),
                    "--out",
                    str(tmp),
                    "--threads",
                    str(threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            tmp.unlink(missing_ok=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        extraction.append(result)
        typer.echo(
            f"extraction {result['fg_rows']} entries: {result['images_per_s']:.1f} images/s, "
            f"peak growth {result['peak_growth_mib']:.1f} MiB"
        )

    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "threads": threads,
        "load_average": [load_start, os.getloadavg()[0]],
        "retrieval": retrieval,
        "extraction": extraction,
    }
    write_json_atomic(out_dir / "memory.json", report)
    lines = [
        f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} cores).",
        "",
        f"Retrieval on the CPU ({threads} thread(s)): {queries} queries x {entries:,} entries x 1024-d, "
        f"median of {repeats}.",
        "",
        "| classes | k | median ms | min ms | setup s |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['classes']} | {r['k']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | {r['setup_s']:.2f} |"
            for r in retrieval
        ),
        "",
        "Extraction: the params.yaml detector (default `small`), 320x160 images, 40 objects each, batch 8, "
        "chunk_rows 4096.",
        "",
        "| fg entries | images | images/s | RSS before MiB | peak RSS MiB | peak growth MiB | file MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {e['fg_rows']:,} | {e['images']} | {e['images_per_s']:.1f} | {e['rss_before_mib']:.0f} | "
            f"{e['peak_rss_mib']:.0f} | {e['peak_growth_mib']:.1f} | {e['file_mib']:.0f} |"
            for e in extraction
        ),
        "",
    ]
    write_text_atomic(out_dir / "memory.md", "\n".join(lines))
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
