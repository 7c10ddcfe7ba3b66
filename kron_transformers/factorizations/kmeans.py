"""K-means for CCE's clustering step (Tsang & Ahle, appendix "K-means" and "Reproducibility").

FAISS (Johnson et al.) when installed, as the paper recommends, scikit-learn otherwise, with
the paper's settings: ``niter=50`` Lloyd iterations on at most ``max_points_per_centroid=256``
points per centroid (a uniform subsample). Every point is then assigned to its nearest
centroid here, in torch, so both backends give pointers for all rows.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch


KMEANS_BACKENDS = ("auto", "faiss", "sklearn")
ASSIGNMENT_CHUNK = 65536


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"faiss"`` when the package is installed, else ``"sklearn"``; checks availability."""
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"kmeans: backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    has_faiss = importlib.util.find_spec("faiss") is not None
    if backend == "auto":
        return "faiss" if has_faiss else "sklearn"
    if backend == "faiss" and not has_faiss:
        raise ValueError("kmeans: backend='faiss' needs the faiss-cpu package (pip install kron_transformers[faiss])")
    return backend


def _fit_centroids(sample: np.ndarray, clusters: int, backend: str, niter: int, seed: int) -> np.ndarray:
    if backend == "faiss":
        import faiss

        # The sample is already capped at max_points_per_centroid per centroid; faiss must not cut it again.
        kmeans = faiss.Kmeans(
            sample.shape[1],
            clusters,
            niter=niter,
            seed=seed,
            max_points_per_centroid=len(sample),
            min_points_per_centroid=1,
            verbose=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
        return kmeans.centroids
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # duplicate points give fewer distinct clusters than asked: not an error here
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=clusters, n_init=1, max_iter=niter, random_state=seed).fit(sample).cluster_centers_


@torch.no_grad()
def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) of every point, in chunks."""
    assignment = torch.empty(len(points), dtype=torch.long, device=points.device)
    centroid_norms = (centroids * centroids).sum(-1)
    for start in range(0, len(points), ASSIGNMENT_CHUNK):
        chunk = points[start : start + ASSIGNMENT_CHUNK]
        distances = centroid_norms - 2 * chunk @ centroids.T  # |x|^2 is the same for every centroid
        assignment[start : start + ASSIGNMENT_CHUNK] = distances.argmin(-1)
    return assignment


@torch.no_grad()
def kmeans(
    points: torch.Tensor,
    clusters: int,
    *,
    backend: str = "auto",
    niter: int = 50,
    max_points_per_centroid: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids (clusters, d), assignment (n,))`` of the ``(n, d)`` points.

    K-means factors the points as a tall one-hot matrix times the centroids (Tsang & Ahle,
    Figure 5). With fewer points than clusters only ``n`` centroids are fitted and the rest are
    zero rows that no point uses; centroids are never NaN (empty clusters keep the k-means
    library's centroid, which both libraries re-seed rather than average over nothing).
    """
    if points.dim() != 2 or len(points) == 0:
        raise ValueError(f"kmeans: points must be a non-empty (n, d) matrix, got shape {tuple(points.shape)}")
    if clusters < 1 or niter < 1 or max_points_per_centroid < 1:
        raise ValueError(
            f"kmeans: clusters, niter and max_points_per_centroid must be >= 1, got {clusters}, {niter}, "
            f"{max_points_per_centroid}"
        )
    backend = resolve_backend(backend)
    fitted = min(clusters, len(points))
    sample = points
    limit = fitted * max_points_per_centroid
    if len(points) > limit:
        generator = torch.Generator().manual_seed(seed)
        sample = points[torch.randperm(len(points), generator=generator)[:limit].to(points.device)]
    centroids_np = _fit_centroids(sample.detach().cpu().double().numpy(), fitted, backend, niter, seed)
    centroids = torch.zeros(clusters, points.shape[1], dtype=points.dtype, device=points.device)
    centroids[:fitted] = torch.as_tensor(np.asarray(centroids_np), dtype=points.dtype, device=points.device)
    return centroids, nearest_centroid(points, centroids[:fitted])
