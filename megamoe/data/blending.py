"""Weighted blend of several datasets (e.g. one GPTDataset per corpus).

Legend: D datasets, N = size of the blend.
  dataset_index[N]         which dataset sample i comes from
  dataset_sample_index[N]  which sample of that dataset (0, 1, 2, ... per dataset)
built by the greedy `build_blending_indices`: after every prefix of the blend each dataset's
share is within about one sample of its weight. Cached like the GPT indices.

order "megatron" reproduces Megatron-Core's BlendedMegatronDatasetBuilder + BlendedDataset:
weights normalised with NumPy as Megatron does (twice, bit for bit), the greedy step
w * max(i, 1) - count, and each dataset built with ceil(ceil(N * w) * 1.005) samples
(`megatron_dataset_sizes`). Datasets of weight 0 are left out of that blend.
"""

from __future__ import annotations

import math

import numpy as np

from megamoe.data.cache import cached_arrays
from megamoe.data.index_builders import build_blending_indices


MEGATRON_SURPLUS = 0.005  # Megatron-Core's mid_level_dataset_surplus default


def megatron_normalize(weights) -> list[float]:
    """Megatron's utils.normalize: float64 array divided by its NumPy sum."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def megatron_dataset_sizes(weights, size: int, surplus: float = MEGATRON_SURPLUS) -> list[int]:
    """Samples Megatron builds per dataset of a blend of `size` (0 for weight-0 datasets)."""
    live = [k for k, w in enumerate(weights) if w > 0]
    w = megatron_normalize([weights[k] for k in live])
    out = [0] * len(weights)
    for k, wk in zip(live, w):
        out[k] = int(math.ceil(math.ceil(size * wk) * (1 + surplus)))
    return out


def _check_blend(arrays: dict, num_datasets: int, size: int) -> str | None:
    di = np.asarray(arrays["dataset_index"], dtype=np.int64)
    dsi = np.asarray(arrays["dataset_sample_index"], dtype=np.int64)
    if di.shape != (size,) or dsi.shape != (size,):
        return f"shapes {di.shape}/{dsi.shape}, expected ({size},)"
    if size and (di.min() < 0 or di.max() >= num_datasets):
        return "dataset_index out of range"
    # dataset_sample_index must count 0, 1, 2, ... within each dataset, in blend order.
    for d, count in enumerate(np.bincount(di, minlength=num_datasets).tolist()):
        if count and not np.array_equal(dsi[di == d], np.arange(count)):
            return "dataset_sample_index is not a running count"
    return None


def blending_indices(weights, size: int, cache_dir: str | None = None, name: str = "train",
                     log=None, order: str = "megamoe") -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index[size], dataset_sample_index[size]) for weights, cached when cache_dir is set."""
    w = [float(x) for x in weights]
    desc = {"kind": "blend", "version": 2, "order": order, "weights": w, "size": int(size)}

    def build():
        if order != "megatron":
            di, dsi = build_blending_indices(np.asarray(w, dtype=np.float64), int(size))
            return {"dataset_index": di, "dataset_sample_index": dsi}
        live = np.array([k for k, x in enumerate(w) if x > 0], dtype=np.int64)
        # The builder normalises, then BlendedDataset normalises again (Megatron's comment:
        # "redundant normalization for bitwise identical comparison"): the bits matter here.
        twice = megatron_normalize(megatron_normalize([w[k] for k in live]))
        di, dsi = build_blending_indices(np.asarray(twice, dtype=np.float64), int(size), megatron=True)
        return {"dataset_index": live[di].astype(di.dtype), "dataset_sample_index": dsi}

    arrays = cached_arrays(cache_dir, f"blend-{name}", desc, ["dataset_index", "dataset_sample_index"],
                           build, log=log, validate=lambda a: _check_blend(a, len(w), int(size)))
    return arrays["dataset_index"], arrays["dataset_sample_index"]


def samples_per_dataset(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """int64[D]: how many samples the blend draws from each dataset."""
    return np.bincount(np.asarray(dataset_index, dtype=np.int64), minlength=num_datasets)


class BlendedDataset:
    """Serve sample i of the blend as ``datasets[dataset_index[i]][dataset_sample_index[i]]``.

    datasets may hold None for a dataset the blend never draws from (weight 0).
    """

    def __init__(self, datasets: list, weights, size: int, cache_dir: str | None = None,
                 name: str = "train", log=None, indices: tuple | None = None, order: str = "megamoe"):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} blending weights")
        self.datasets = list(datasets)
        self.weights = [float(x) for x in weights]
        self.size = int(size)
        self.name = name
        if indices is None:
            indices = blending_indices(self.weights, self.size, cache_dir, name, log, order)
        self.dataset_index, self.dataset_sample_index = indices
        need = samples_per_dataset(self.dataset_index, len(self.datasets))
        for k, (ds, n) in enumerate(zip(self.datasets, need)):
            have = 0 if ds is None else len(ds)
            if n > have:
                raise ValueError(f"blended {name} dataset draws {n} samples from dataset {k} "
                                 f"but it has only {have}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range [0, {self.size}) in blended {self.name} dataset")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
