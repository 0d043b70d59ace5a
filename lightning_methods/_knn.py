"""Exact k-nearest-neighbour search in squared Euclidean distance (private; used by :mod:`lightning_methods.resmem`).

Two interchangeable backends return the same neighbours:

* :class:`TorchKNN` (default): blocked matrix multiply + top-k in plain torch, on whatever device the keys live on.
  Queries are processed ``query_block`` at a time against ``block_size`` keys at a time, so the search never holds
  more than a ``query_block x block_size`` tile of scores, whatever the number of keys.
* :class:`FaissKNN`: ``faiss.IndexFlatL2`` (CPU), when faiss is installed.

Both return distances recomputed as ``||q - m||^2`` for the ``k`` neighbours they found (so a query equal to a
memory row is at distance exactly 0), sorted in increasing order.

Exactness of the torch search. Ranking by ``||m||^2 - 2 q.m`` in float32 loses the small differences between
near-duplicate keys (tight clusters) and keys of large norm (``||m||^2 ~ 1600``): on such data the plain float32
ranking returned the true k-set for 0% and 87% of queries. So the search (1) centres keys and queries on the keys'
mean (distances do not change; norms, and so rounding errors, shrink), (2) fetches ``k + max(k, 16)`` candidates by
the float32 scores, (3) recomputes their distances exactly (float64 differences) and re-ranks them, and (4) certifies
each query: with ``delta`` a worst-case bound on the float32 score error, any key left out has a true distance of at
least (largest candidate score) - ``delta``; where that is not above the k-th exact distance, the query is searched
again over all keys in float64. The k-set returned is then the true one (up to exact ties).
"""

from __future__ import annotations

import importlib.util
import math

import torch

__all__ = ["TorchKNN", "FaissKNN", "build_knn_index", "knn_search", "faiss_available", "BACKENDS"]

BACKENDS = ("torch", "faiss")
#: queries per tile of the torch search (a tile holds ``QUERY_BLOCK x block_size`` scores)
QUERY_BLOCK = 512


def faiss_available() -> bool:
    """Whether the optional faiss backend can be imported (checked without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def _check_search(queries: torch.Tensor, num_keys: int, dim: int, k: int, exclude: torch.Tensor | None) -> None:
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"Queries must have shape (num_queries, {dim}), got {tuple(queries.shape)}.")
    available = num_keys - (1 if exclude is not None else 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if k > available:
        what = f"{num_keys} entries" + (" minus the query itself" if exclude is not None else "")
        raise ValueError(f"`k={k}` is larger than the memory ({what}): use `k <= {available}`.")
    if exclude is not None and exclude.shape != (queries.shape[0],):
        raise ValueError(f"`exclude` must hold one key index per query, got shape {tuple(exclude.shape)}.")


def _refine(queries: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``||q - m||^2`` of the found neighbours, re-sorted (stable, so equal distances keep the search's order)."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=keys.device)
    chunk = max(1, 2**18 // max(1, idx.shape[1] * keys.shape[1]))  # ~1 MiB of gathered keys at a time
    for s in range(0, len(idx), chunk):
        diff = keys[idx[s : s + chunk]].double() - queries[s : s + chunk].double().unsqueeze(1)
        out[s : s + chunk] = diff.pow(2).sum(-1)
    out, order = out.sort(dim=1, stable=True)
    return out.to(keys.dtype), idx.gather(1, order)


class TorchKNN:
    """Exact kNN over fixed ``keys`` by blocked matrix multiply + top-k, in torch, on the keys' device.

    Scores of a tile are ``||m||^2 - 2 q.m`` (the query norm does not change a row's ranking), computed by one GEMM
    against the keys stored transposed with their squared norms appended as an extra row. On CPU, each tile is
    screened before any top-k: keys are split into groups of ``group`` (strided) columns, and a group whose minimum
    score is above the row's current k-th best cannot hold a neighbour, so only the elements of the few surviving
    groups are merged. The first tile's threshold is the k-th smallest group minimum, an upper bound on the tile's
    k-th smallest score (k distinct groups each have an element at most that large). On GPU, where ``topk`` is
    cheap and host synchronisation is not, each tile is reduced with a plain ``topk`` and merged.

    Args:
        keys: the memory, shape ``(num_keys, dim)``.
        block_size: keys per tile.
        query_block: queries per tile; a tile holds ``query_block x block_size`` scores.
        group: keys per screening group (CPU).
    """

    def __init__(self, keys: torch.Tensor, block_size: int = 4096, query_block: int = QUERY_BLOCK, group: int = 16) -> None:
        if keys.ndim != 2 or keys.shape[0] == 0:
            raise ValueError(f"Keys must be a non-empty (num_keys, dim) matrix, got shape {tuple(keys.shape)}.")
        for name, value in (("block_size", block_size), ("query_block", query_block), ("group", group)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.keys = keys
        self.block_size, self.query_block, self.group = block_size, query_block, group
        num_keys, dim = keys.shape
        self._center = keys.double().mean(0)
        centred = (keys.double() - self._center).to(keys.dtype)
        self._kt = torch.empty(dim + 1, num_keys, dtype=keys.dtype, device=keys.device)
        self._kt[:dim] = centred.T * -2.0
        self._kt[dim] = centred.pow(2).sum(1)
        self._max_norm = float(centred.double().norm(dim=1).max())
        # worst-case relative rounding of a float32 (or the keys' dtype) dot product of length dim + 1, doubled
        self._unit = 2.0 * (dim + 2) * torch.finfo(keys.dtype).eps / 2

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest keys of each query.

        Args:
            queries: shape ``(num_queries, dim)``.
            k: neighbours per query.
            exclude: optional key index per query that may not be returned (leave-one-out: a point is never its
                own neighbour).

        Returns:
            ``(squared_distances, indices)``, both ``(num_queries, k)``, nearest first.
        """
        num_keys, dim = self.keys.shape
        _check_search(queries, num_keys, dim, k, exclude)
        queries = queries.to(self.keys)
        available = num_keys - (1 if exclude is not None else 0)
        fetch = min(available, k + max(k, 16))  # over-fetch, then re-rank exactly (module docstring)
        grouped = self.keys.device.type == "cpu"
        bq = min(self.query_block, max(len(queries), 1))
        tile = torch.empty(bq, min(self.block_size, num_keys), dtype=self.keys.dtype, device=self.keys.device)
        centred_q = (queries.double() - self._center).to(self.keys.dtype)
        qa = torch.ones(len(queries), dim + 1, dtype=self.keys.dtype, device=self.keys.device)
        qa[:, :dim] = centred_q
        idx = torch.empty(len(queries), fetch, dtype=torch.long, device=self.keys.device)
        worst = torch.empty(len(queries), dtype=torch.float64, device=self.keys.device)
        for s in range(0, len(queries), bq):
            ex = exclude[s : s + bq] if exclude is not None else None
            scores, idx[s : s + bq] = self._search_block(qa[s : s + bq], fetch, tile, ex, grouped)
            worst[s : s + bq] = scores.double().amax(1)
        dist, idx = _refine(queries, self.keys, idx)
        dist, idx = dist[:, :k], idx[:, :k]
        if fetch < available:
            # certify: a key left out has true distance >= its score + ||q||^2 - delta >= worst + ||q||^2 - delta
            qn = centred_q.double().norm(dim=1)
            delta = self._unit * (2 * qn * self._max_norm + 2 * self._max_norm**2 + qn**2)
            unsure = (worst + qn**2 - delta < dist[:, -1].double()).nonzero().squeeze(1)
            if unsure.numel():
                ex = exclude[unsure] if exclude is not None else None
                dist[unsure], idx[unsure] = self._exact(queries[unsure], k, ex)
        return dist, idx

    def _exact(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Brute force in float64 (the rare queries the float32 search cannot certify)."""
        q = queries.double() - self._center
        best = torch.empty(len(q), 0, dtype=torch.float64, device=q.device)
        best_idx = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for t in range(0, self.num_keys, self.block_size):
            m = self.keys[t : t + self.block_size].double() - self._center
            d = torch.cdist(q, m).pow(2) if len(q) else q.new_empty(0, len(m))
            if exclude is not None:
                hit = ((exclude >= t) & (exclude < t + len(m))).nonzero().squeeze(1)
                d[hit, exclude[hit] - t] = math.inf
            j = torch.arange(t, t + len(m), device=q.device).expand(len(q), -1)
            best, best_idx = torch.cat([best, d], 1), torch.cat([best_idx, j], 1)
            if best.shape[1] > k:
                best, pick = best.topk(k, dim=1, largest=False)
                best_idx = best_idx.gather(1, pick)
        return _refine(queries, self.keys, best_idx)

    def _search_block(
        self, qa: torch.Tensor, k: int, tile: torch.Tensor, exclude: torch.Tensor | None, grouped: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nb, device = len(qa), qa.device
        best = torch.full((nb, k), math.inf, dtype=tile.dtype, device=device)
        best_idx = torch.zeros(nb, k, dtype=torch.long, device=device)
        tau: torch.Tensor | None = None  # each row's current k-th best score (None before the first tile)
        g = self.group
        for t in range(0, self.num_keys, self.block_size):
            w = min(self.block_size, self.num_keys - t)
            scores = tile[:nb, :w]
            torch.mm(qa, self._kt[:, t : t + w], out=scores)
            if exclude is not None:
                hit = ((exclude >= t) & (exclude < t + w)).nonzero().squeeze(1)
                scores[hit, exclude[hit] - t] = math.inf
            if not grouped or w % g or w // g < k:
                # plain top-k of the tile, merged with the running best
                v, j = scores.topk(min(k, w), dim=1, largest=False, sorted=False)
                best, best_idx = _merge(best, best_idx, v, j + t, k)
                tau = best.amax(1, keepdim=True)
                continue
            num_groups = w // g
            group_min = scores.view(nb, g, num_groups).amin(1)  # group c = columns c, c + G, c + 2G, ...
            if tau is None:
                tau = group_min.kthvalue(k, dim=1, keepdim=True).values
            rows, cols = (group_min <= tau).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            pos = cols.unsqueeze(1) + torch.arange(0, w, num_groups, device=device)  # (P, g) columns of each group
            vals = tile.view(-1)[(rows * tile.shape[1]).unsqueeze(1) + pos]
            keep = (vals <= tau[rows]).view(-1).nonzero().squeeze(1)
            cand_rows, cand_vals, cand_idx = rows[keep // g], vals.view(-1)[keep], pos.view(-1)[keep] + t
            # scatter the few candidates (sorted by row, as nonzero returns them) into a dense block per row
            counts = torch.bincount(cand_rows, minlength=nb)
            slot = torch.arange(len(cand_rows), device=device) - (counts.cumsum(0) - counts)[cand_rows]
            width = int(counts.max())
            dense_v = torch.full((nb, width), math.inf, dtype=tile.dtype, device=device)
            dense_i = torch.zeros(nb, width, dtype=torch.long, device=device)
            dense_v[cand_rows, slot] = cand_vals
            dense_i[cand_rows, slot] = cand_idx
            upd = counts.nonzero().squeeze(1)
            best[upd], best_idx[upd] = _merge(best[upd], best_idx[upd], dense_v[upd], dense_i[upd], k)
            tau[upd] = best[upd].amax(1, keepdim=True)
        return best, best_idx


def _merge(
    best: torch.Tensor, best_idx: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    v, j = torch.cat([best, vals], 1).topk(k, dim=1, largest=False, sorted=False)
    return v, torch.cat([best_idx, idx], 1).gather(1, j)


class FaissKNN:
    """Exact kNN with ``faiss.IndexFlatL2`` (CPU); same interface and same neighbours as :class:`TorchKNN`."""

    def __init__(self, keys: torch.Tensor) -> None:
        try:
            import faiss
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("`knn_backend='faiss'` needs faiss: `pip install faiss-cpu`, or use 'torch'.") from err
        if keys.ndim != 2 or keys.shape[0] == 0:
            raise ValueError(f"Keys must be a non-empty (num_keys, dim) matrix, got shape {tuple(keys.shape)}.")
        self.keys = keys
        self._index = faiss.IndexFlatL2(keys.shape[1])
        self._index.add(keys.detach().to("cpu", torch.float32).contiguous().numpy())

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`TorchKNN.search`."""
        num_keys, dim = self.keys.shape
        _check_search(queries, num_keys, dim, k, exclude)
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        extra = 1 if exclude is not None else 0
        _, found = self._index.search(q, k + extra)
        idx = torch.from_numpy(found)
        if exclude is not None:
            # drop the query's own index, or the farthest of the k + 1 when it was not among them
            drop = idx == exclude.cpu().unsqueeze(1)
            drop[:, -1] |= ~drop.any(1)
            idx = idx[~drop].view(len(idx), k)
        return _refine(queries.to(self.keys), self.keys, idx.to(self.keys.device))


def build_knn_index(keys: torch.Tensor, backend: str = "torch", block_size: int = 4096) -> TorchKNN | FaissKNN:
    """An exact kNN index over ``keys`` with the chosen backend (``"torch"`` or ``"faiss"``)."""
    if backend == "torch":
        return TorchKNN(keys, block_size=block_size)
    if backend == "faiss":
        return FaissKNN(keys)
    raise ValueError(f"`knn_backend` must be one of {BACKENDS}, got {backend!r}.")


def knn_search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    backend: str = "torch",
    block_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off exact kNN search; see :meth:`TorchKNN.search`."""
    return build_knn_index(keys, backend, block_size).search(queries, k, exclude)
