"""Weighted blend of several datasets (e.g. one GPTDataset per corpus).

Legend: D datasets, N = size of the blend.
  dataset_index[N]         which dataset sample i comes from
  dataset_sample_index[N]  which sample of that dataset (0, 1, 2, ... per dataset)
built by the greedy `build_blending_indices`: after every prefix of the blend each dataset's
share is within about one sample of its weight. Cached like the GPT indices.
"""

from __future__ import annotations

import numpy as np

from megamoe.data.cache import cached_arrays
from megamoe.data.index_builders import build_blending_indices


def blending_indices(weights, size: int, cache_dir: str | None = None, name: str = "train",
                     log=None) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index[size], dataset_sample_index[size]) for weights, cached when cache_dir is set."""
    w = [float(x) for x in weights]
    desc = {"kind": "blend", "version": 1, "weights": w, "size": int(size)}

    def build():
        di, dsi = build_blending_indices(np.asarray(w, dtype=np.float64), int(size))
        return {"dataset_index": di, "dataset_sample_index": dsi}

    arrays = cached_arrays(cache_dir, f"blend-{name}", desc, ["dataset_index", "dataset_sample_index"],
                           build, log=log)
    return arrays["dataset_index"], arrays["dataset_sample_index"]


def samples_per_dataset(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """int64[D]: how many samples the blend draws from each dataset."""
    return np.bincount(np.asarray(dataset_index, dtype=np.int64), minlength=num_datasets)


class BlendedDataset:
    """Serve sample i of the blend as ``datasets[dataset_index[i]][dataset_sample_index[i]]``.

    datasets may hold None for a dataset the blend never draws from (weight 0).
    """

    def __init__(self, datasets: list, weights, size: int, cache_dir: str | None = None,
                 name: str = "train", log=None, indices: tuple | None = None):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} blending weights")
        self.datasets = list(datasets)
        self.weights = [float(x) for x in weights]
        self.size = int(size)
        self.name = name
        if indices is None:
            indices = blending_indices(self.weights, self.size, cache_dir, name, log)
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
