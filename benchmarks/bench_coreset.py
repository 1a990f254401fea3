"""Benchmark: vspa's greedy k-center against a plain PatchCore approximate greedy coreset.

Both run in the same process on the same features: 58,701 x 1024 (Sim10k's object count) random but
clustered vectors, L2-normalised, keeping 50%. Reported: each method's wall time and the coverage radius
of its subset (largest distance from a dropped row to its nearest kept row, exact, in the full
1024-d normalised space), plus the radius of a random subset of the same size.

    python benchmarks/bench_coreset.py                 # full size, writes reports/bench/coreset.{json,md}
    python benchmarks/bench_coreset.py --n 5000        # quick check

vspa's k-center runs exact (``projection_dims`` 0: the full 1024-d normalised features), with the
same 128-d random projection as the baseline, and with a 256-d one.

The PatchCore baseline is written here from the description of its ApproximateGreedyCoresetSampler:
random linear projection to 128 dimensions, the starting distances are the mean distance to 10 random
rows, then every iteration recomputes the (squared-norm expanded) distances of all rows to the newest
centre, concatenates them with the running minimum and takes the minimum again.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import typer

from vspa.coreset.kcenter import coverage_radius, kcenter_greedy, l2_normalize, num_to_keep, random_subsample
from vspa.utils import write_json_atomic, write_text_atomic


def clustered_features(n: int, dim: int = 1024, clusters: int = 300, latent: int = 64, seed: int = 0) -> torch.Tensor:
    """Box-head-like vectors: a Gaussian mixture in a ``latent``-d space with cluster sizes from a power law,
    mapped to ``dim`` dimensions by a random linear map, plus isotropic noise, through a ReLU."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float64) ** 1.1
    assign = torch.multinomial(weights, n, replacement=True, generator=g)
    centres = 2.0 * torch.randn(clusters, latent, generator=g)
    spread = 0.3 + 0.7 * torch.rand(clusters, 1, generator=g)
    z = centres[assign] + spread[assign] * torch.randn(n, latent, generator=g)
    lift = torch.randn(latent, dim, generator=g) / latent**0.5
    return torch.relu(z @ lift + 0.3 * torch.randn(n, dim, generator=g))


class PatchCoreApproximateGreedy:
    """A plain reimplementation of PatchCore's approximate greedy coreset (the baseline)."""

    def __init__(self, percentage: float, dimension: int = 128, starting_points: int = 10, seed: int = 0):
        self.percentage = percentage
        self.dimension = dimension
        self.starting_points = starting_points
        self.seed = seed

    @staticmethod
    def batchwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a_times_a = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
        b_times_b = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
        a_times_b = a.mm(b.T)
        return (-2 * a_times_b + a_times_a + b_times_b).clamp(0, None).sqrt()

    def select(self, features: torch.Tensor, count: int | None = None) -> np.ndarray:
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        with torch.no_grad():
            mapper = torch.nn.Linear(features.shape[1], self.dimension, bias=False)
            reduced = mapper(features)
            starts = np.random.choice(len(reduced), min(self.starting_points, len(reduced)), replace=False).tolist()
            anchor = self.batchwise_distances(reduced, reduced[starts]).mean(dim=-1).reshape(-1, 1)
            count = int(len(reduced) * self.percentage) if count is None else count
            chosen = []
            for _ in range(count):
                idx = torch.argmax(anchor).item()
                chosen.append(idx)
                new = self.batchwise_distances(reduced, reduced[idx : idx + 1])
                anchor = torch.cat([anchor, new], dim=-1)
                anchor = torch.min(anchor, dim=1).values.reshape(-1, 1)
        return np.array(chosen)


def main(
    n: int = typer.Option(58701, help="Rows (Sim10k's object count by default)."),
    dim: int = typer.Option(1024, help="Feature dimension."),
    ratio: float = typer.Option(0.5, help="Fraction kept."),
    projection_dims: str = typer.Option(
        "0,128,256", help="vspa k-center projections to run, comma-separated (0 = exact)."
    ),
    threads: int = typer.Option(1, help="torch threads for every method."),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("reports/bench"), help="Where coreset.json / coreset.md go."),
) -> None:
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    x = l2_normalize(clustered_features(n, dim, seed=seed))
    k = num_to_keep(n, ratio)
    results = {}

    kept = {}
    for dim_ in [int(v) for v in projection_dims.split(",")]:
        name = f"vspa_kcenter_p{dim_}"
        t = time.perf_counter()
        kept[name] = kcenter_greedy(x, k, projection_dim=dim_, seed=seed, progress=None).numpy()
        results[name] = {"seconds": time.perf_counter() - t, "projection_dim": dim_}
        typer.echo(f"{name}: {results[name]['seconds']:.1f} s")

    t = time.perf_counter()
    base = PatchCoreApproximateGreedy(ratio, 128, 10, seed).select(x, count=k)
    results["patchcore_approx_greedy"] = {"seconds": time.perf_counter() - t, "projection_dim": 128}
    typer.echo(f"PatchCore approximate greedy: {results['patchcore_approx_greedy']['seconds']:.1f} s")

    kept["patchcore_approx_greedy"] = base
    kept["random"] = random_subsample(n, k, seed).numpy()
    for name, rows in kept.items():
        t = time.perf_counter()
        results.setdefault(name, {})["radius"] = coverage_radius(x, rows)
        results[name]["kept"] = int(len(np.unique(rows)))
        typer.echo(f"{name}: radius {results[name]['radius']:.4f} ({time.perf_counter() - t:.1f} s to measure)")
    baseline = results["patchcore_approx_greedy"]
    for r in results.values():
        if "seconds" in r:
            r["speedup_vs_patchcore"] = baseline["seconds"] / r["seconds"]
            r["radius_vs_patchcore"] = r["radius"] / baseline["radius"]
    report = {
        "rows": n,
        "dim": dim,
        "ratio": ratio,
        "kept": k,
        "threads": threads,
        "seed": seed,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "load_average": [load_start, os.getloadavg()[0]],
        "methods": results,
        "data": "clustered_features(): 300-cluster power-law mixture in 64-d, random map to 1024-d, noise, ReLU",
    }
    write_json_atomic(out_dir / "coreset.json", report)
    rows = []
    for name, r in results.items():
        if "seconds" in r:
            timing = [f"{r['seconds']:.1f}", f"{r['speedup_vs_patchcore']:.2f}x", f"{r['radius_vs_patchcore']:.3f}"]
        else:
            timing = ["-", "-", f"{r['radius'] / baseline['radius']:.3f}"]
        rows.append(f"| {name} | {timing[0]} | {r['radius']:.4f} | {r['kept']} | {timing[1]} | {timing[2]} |")
    write_text_atomic(
        out_dir / "coreset.md",
        "\n".join(
            [
                f"Coreset on {n:,} x {dim} clustered features, keeping {ratio:.0%} ({k:,} rows), "
                f"{threads} CPU thread(s), same process; 1-minute load average {load_start:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores).",
                "",
                "| method | seconds | coverage radius | kept | speed-up vs PatchCore | radius / PatchCore's |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
                *rows,
                "",
            ]
        ),
    )
    typer.echo((out_dir / "coreset.md").read_text())


if __name__ == "__main__":
    typer.run(main)
