"""Exact kNN search speed of ResMem's torch backend vs faiss-cpu ``IndexFlatL2`` and scikit-learn ``NearestNeighbors``.

Same memory, same queries, one CPU thread for every library (torch, faiss's OpenMP, scikit-learn's threadpools);
memories of unit vectors (as ResMem's L2-normalised embeddings), queries likewise. The three searches run
interleaved in every repeat, so machine noise hits them alike; the speed ratio is the median over repeats of
``faiss time / torch time`` measured in the same repeat. Results are compared with faiss's (identical neighbour
lists, largest difference in squared distance). Peak memory is the growth of the peak resident set during one
search, each library in a fresh process (``/proc/self/status`` VmHWM, reset just before the search, minus the
resident set then), next to what a full distance matrix would take.

    python benchmarks/resmem_knn.py            # full run (~3 min on one core), writes benchmarks/results/resmem_knn.md
    python benchmarks/resmem_knn.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lightning_methods._knn import QUERY_BLOCK, TorchKNN

RESULTS = Path(__file__).parent / "results"


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:  # not Linux
        return None
    return int(match.group(1)) if match else None


def peak_growth_mib(fn) -> tuple[object, float | None]:
    """Run ``fn`` and return its result and how much the peak RSS grew above the RSS before it (MiB, Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return fn(), None
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return result, (peak - before) / 1024 if before is not None and peak is not None else None


def _unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def _data(num_keys: int, dim: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return _unit(num_keys, dim, g), _unit(num_queries, dim, g)


def _searches(keys: torch.Tensor, queries: torch.Tensor, k: int, block_size: int, only: str | None = None) -> dict:
    """Build each library's index over ``keys`` (outside any timing) and return its search as a thunk."""
    searches = {}
    if only in (None, "torch"):
        index = TorchKNN(keys, block_size=block_size)
        searches["torch"] = lambda: index.search(queries, k)
    if only in (None, "faiss"):
        import faiss

        faiss_index = faiss.IndexFlatL2(keys.shape[1])
        faiss_index.add(keys.numpy())
        searches["faiss"] = lambda: faiss_index.search(queries.numpy(), k)
    if only in (None, "sklearn"):
        from sklearn.neighbors import NearestNeighbors

        sk = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=1).fit(keys.numpy())
        searches["sklearn"] = lambda: sk.kneighbors(queries.numpy(), k)
    return searches


def _single_threaded():
    import faiss
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    return threadpool_limits(1)


def peak_in_fresh_process(library: str, num_keys: int, dim: int, num_queries: int, k: int, block_size: int) -> float | None:
    """Peak RSS growth (MiB) of one search by ``library``, measured in a new Python process."""
    args = [sys.executable, __file__, "--peak_of", library, f"{num_keys}x{dim}", str(num_queries), str(k), str(block_size)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def _report_peak(library: str, shape: str, num_queries: str, k: str, block_size: str) -> None:
    n, d = (int(v) for v in shape.split("x"))
    with _single_threaded():
        keys, queries = _data(n, d, int(num_queries))
        search = _searches(keys, queries, int(k), int(block_size), only=library)[library]
        _, peak = peak_growth_mib(search)
    print(json.dumps({"peak_mib": peak}))


def bench(num_keys: int, dim: int, num_queries: int, k: int, repeats: int, block_size: int, peaks_of=None) -> dict:
    """One row of the table; ``peaks_of``: the libraries whose peak memory is measured (default: all three)."""
    keys, queries = _data(num_keys, dim, num_queries)
    searches = _searches(keys, queries, k, block_size)
    results = {name: fn() for name, fn in searches.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in searches}
    for _ in range(repeats):
        for name, fn in searches.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    t_d, t_i = (r.numpy() for r in results["torch"])
    f_d, f_i = results["faiss"]
    s_d, s_i = results["sklearn"]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "memory": f"{num_keys:,} x {dim}",
        "queries": num_queries,
        "k": k,
        "qps": {name: num_queries / t for name, t in median.items()},
        "vs_faiss": statistics.median(f / t for f, t in zip(times["faiss"], times["torch"])),
        "vs_sklearn": statistics.median(s / t for s, t in zip(times["sklearn"], times["torch"])),
        "same_as_faiss": float((t_i == f_i).all(axis=1).mean()),
        "same_as_sklearn": float((t_i == s_i).all(axis=1).mean()),
        "max_d2_diff": float(max(np.abs(t_d - f_d).max(), np.abs(t_d - s_d**2).max())),
        "peak_mib": {
            name: peak_in_fresh_process(name, num_keys, dim, num_queries, k, block_size)
            if peaks_of is None or name in peaks_of else None
            for name in searches
        },
        "tile_mib": min(QUERY_BLOCK, num_queries) * min(block_size, num_keys) * 4 / 2**20,
        "full_matrix_mib": num_queries * num_keys * 4 / 2**20,
    }


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _versions() -> str:
    import faiss
    import sklearn

    return f"torch {torch.__version__}, faiss-cpu {faiss.__version__}, scikit-learn {sklearn.__version__}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Exact kNN: ResMem's torch search vs faiss-cpu IndexFlatL2 and scikit-learn NearestNeighbors",
        "",
        f"`python benchmarks/resmem_knn.py` (one CPU thread each; {args.repeats} interleaved repeats; unit-norm random "
        f"memory and queries; torch `block_size={args.block_size}`). Queries/s are medians; *vs faiss* / *vs sklearn* "
        "are the median per-repeat speed ratios (> 1: torch is faster). *Same* = fraction of queries whose k "
        "neighbour indices are identical, in order. Peak = growth of the peak RSS during one search, each library in a "
        "fresh process (MiB); *torch tile* is the largest score block the torch search holds.",
        "",
        f"Versions: {_versions()}.",
        "",
        "| memory | queries | k | torch q/s | faiss q/s | sklearn q/s | torch vs faiss | torch vs sklearn | same as faiss / sklearn | max Δd² | peak MiB torch / faiss / sklearn | torch tile MiB | full matrix MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        q, p = r["qps"], r["peak_mib"]
        lines.append(
            f"| {r['memory']} | {r['queries']} | {r['k']} | {q['torch']:.0f} | {q['faiss']:.0f} | {q['sklearn']:.0f} | "
            f"{r['vs_faiss']:.2f}x | {r['vs_sklearn']:.2f}x | {r['same_as_faiss']:.4f} / {r['same_as_sklearn']:.4f} | "
            f"{r['max_d2_diff']:.1e} | {_mib(p['torch'])} / {_mib(p['faiss'])} / {_mib(p['sklearn'])} | "
            f"{r['tile_mib']:.0f} | {r['full_matrix_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["50000x128", "200000x64"], help="memory sizes, NxD")
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block_size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "resmem_knn.md")
    parser.add_argument("--peak_of", nargs=5, help=argparse.SUPPRESS)  # internal: one peak measurement
    args = parser.parse_args(argv)
    if args.peak_of:
        _report_peak(*args.peak_of)
        return []
    if args.quick:
        args.shapes, args.queries, args.repeats = ["3000x16"], 200, 1
    rows = []
    with _single_threaded():
        for shape in args.shapes:
            n, d = (int(v) for v in shape.lower().split("x"))
            for k in args.k:
                # --quick: one fresh process (torch's), not three: the smoke run checks the path, not the numbers
                row = bench(n, d, args.queries, k, args.repeats, args.block_size, ["torch"] if args.quick else None)
                rows.append(row)
                print(
                    f"{row['memory']} k={k}: torch {row['qps']['torch']:.0f} q/s, faiss {row['qps']['faiss']:.0f}, "
                    f"sklearn {row['qps']['sklearn']:.0f}; torch vs faiss {row['vs_faiss']:.2f}x; same "
                    f"{row['same_as_faiss']:.4f}",
                    flush=True,
                )
    table = markdown(rows, args)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return rows


if __name__ == "__main__":
    main()
