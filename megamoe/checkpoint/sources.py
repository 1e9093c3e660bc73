"""Read side of checkpoints: every saved tensor's pieces by name, for every format.

  ShardedSource   a parallel run's step dir: model_rank{r}.pt / optim_rank{r}.pt + metadata.json
                  (rank files opened with mmap, only those metadata.json lists for a name)
  SingleSource    a single-process run's model.pt + optimizer.pt (AdamW state by position)
  WeightsSource   a model-only checkpoint written by a conversion (weights.py)
`open_source(ckpt_dir)` picks the right one. Tied embeddings: a name the checkpoint lacks is
read from its tied partner (embed.weight <-> lm_head.weight). `release()` closes the files a
source opened (their mmaps keep every page read in RSS): streaming readers call it per layer.
"""

from __future__ import annotations

import os

import torch
import yaml

from megamoe.checkpoint import files
from megamoe.checkpoint.reshard import Piece, as_index, assemble
from megamoe.checkpoint.stfiles import SafetensorsFile
from megamoe.parallel.params import full_index

FORMAT, VERSION, META = "megamoe-sharded", 1, "metadata.json"
WEIGHTS_FORMAT, WEIGHTS_VERSION = "megamoe-weights", 1     # model-only (weights.py)
MOMENTS = ("exp_avg", "exp_avg_sq")
TIED = {"embed.weight": "lm_head.weight", "lm_head.weight": "embed.weight"}


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _load_mmap(ckpt_dir: str, fname: str):
    return files.load_file(ckpt_dir, fname, mmap=True)


class Source:
    """Read side of a checkpoint: every saved tensor's pieces, by name. Subclasses fill `names`
    ({name: {"shape", "dtype"}}) and define weight_pieces(name) -> [Piece], optim_pieces(name)
    -> [optimizer piece dict] and rng(rank) -> RNG state or None."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.config = _read_yaml(os.path.join(ckpt_dir, "config.yaml"))
        self.tie = bool((self.config.get("model") or {}).get("tie_embeddings", False))
        self.names: dict[str, dict] = {}
        self.has_masters = self.legacy = False

    def trainer_state(self) -> dict:
        return dict(files.load_file(self.dir, "trainer.pt"))

    def release(self) -> None:
        """Close the files opened so far (they reopen when needed)."""

    def _candidates(self, name: str) -> list[str]:
        """`name`, then its tied partner (a head copy, or moments saved once for both)."""
        names = [name] + ([TIED[name]] if self.tie and name in TIED else [])
        return [n for n in names if n in self.names]

    def has(self, name: str) -> bool:
        return bool(self._candidates(name))

    def global_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.names[self._candidates(name)[0]]["shape"])

    def pieces(self, name: str, key: str) -> list[Piece]:
        for n in self._candidates(name):
            found = self.weight_pieces(n) if key == "weight" else \
                [(d["index"], d["flat"], d[key]) for d in self.optim_pieces(n) if key in d]
            if found:
                return found
        return []

    def assemble(self, name: str, key: str, index, dtype=None) -> torch.Tensor | None:
        return assemble(self.pieces(name, key), index, dtype, f"{name!r} ({key}) in {self.dir!r}")

    def weights(self, name: str, index, dtype=None) -> torch.Tensor:
        """Slice `index` of the weights: the fp32 masters where saved (exact), else the params."""
        master = self.assemble(name, "master", index, dtype) if self.has_masters else None
        return master if master is not None else self.assemble(name, "weight", index, dtype)

    def optim_state(self, name: str, index) -> dict | None:
        """{"step", "exp_avg", "exp_avg_sq", "master" (or None)} of slice `index`; None when
        no optimizer state was saved (a checkpoint written before the first step)."""
        for n in self._candidates(name):
            found = self.optim_pieces(n)
            if found:
                break
        else:
            return None
        state = {"step": max(float(d["step"]) for d in found)}
        for key in (*MOMENTS, "master"):
            state[key] = assemble([(d["index"], d["flat"], d[key]) for d in found if key in d], index,
                                  None, f"{n!r} ({key}) in {self.dir!r}")
        return state


class ShardedSource(Source):
    def __init__(self, ckpt_dir: str, meta: dict | None):
        """meta: metadata.json's contents; None for a checkpoint written before it existed."""
        super().__init__(ckpt_dir)
        self._files: dict[str, dict] = {}
        self.legacy = meta is None
        if self.legacy:
            self.meta = self._scan_model_files()
        else:
            self.meta = meta
            if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
                path = os.path.join(ckpt_dir, META)
                raise ValueError(f"{path!r} is not a megamoe sharded checkpoint of version <= {VERSION}")
        self.names = self.meta["tensors"]
        self.has_masters = not self.legacy

    def _scan_model_files(self) -> dict:
        """Index of a checkpoint written before metadata.json existed (weights only)."""
        ranks = sorted(int(f[len("model_rank"):-3]) for f in os.listdir(self.dir)
                       if f.startswith("model_rank") and f.endswith(".pt"))
        world = _read_yaml(os.path.join(self.dir, "layout.yaml")).get("world_size", len(ranks))
        if ranks != list(range(world)):
            raise ValueError(f"{self.dir!r} has {len(ranks)} model_rank files but layout.yaml says "
                             f"world_size {world}")
        tensors: dict[str, dict] = {}
        for r in ranks:
            data = self._file(f"model_rank{r}.pt")
            for name, t in data["model"].items():
                spec = data.get("specs", {}).get(name)
                shape = list(spec["global_shape"]) if spec else list(t.shape)
                info = tensors.setdefault(name, {"shape": shape, "dtype": _dtype_name(t.dtype),
                                                 "model_ranks": [], "optim_ranks": []})
                info["model_ranks"].append(r)
        return {"format": FORMAT, "world_size": world, "layout": {}, "tensors": tensors}

    def release(self) -> None:
        self._files.clear()

    def _file(self, fname: str) -> dict:
        if fname not in self._files:
            self._files[fname] = _load_mmap(self.dir, fname)
        return self._files[fname]

    def weight_pieces(self, name: str) -> list[Piece]:
        out = []
        for r in self.names[name]["model_ranks"]:
            data = self._file(f"model_rank{r}.pt")
            t, spec = data["model"][name], data["specs"].get(name)
            out.append((spec["index"] if spec else full_index(t.shape), None, t))
        return out

    def optim_pieces(self, name: str) -> list[dict]:
        return [self._file(f"optim_rank{r}.pt")["optim"][name] for r in self.names[name]["optim_ranks"]]

    def rng(self, rank: int) -> dict | None:
        if self.legacy or rank >= self.meta["world_size"]:
            return None
        return self._file(f"optim_rank{rank}.pt").get("rng")


class SingleSource(Source):
    """model.pt + optimizer.pt of a single-process run (torch AdamW state keyed by position)."""

    def __init__(self, ckpt_dir: str):
        super().__init__(ckpt_dir)
        self.model = self._model()
        self.names = {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in self.model.items()}
        self._optim: dict[str, dict] | None = None

    def _model(self) -> dict:
        model = _load_mmap(self.dir, "model.pt")
        if not isinstance(model, dict):
            raise ValueError(f"{self.dir!r}: model.pt does not hold a state dict")
        return model

    def release(self) -> None:
        self.model = self._optim = None

    def weight_pieces(self, name: str) -> list[Piece]:
        if self.model is None:
            self.model = self._model()
        t = self.model[name]
        return [(full_index(t.shape), None, t)]

    def optim_pieces(self, name: str) -> list[dict]:
        if self._optim is None:
            self._optim = self._optim_by_name()
        st = self._optim.get(name)
        if st is None:
            return []
        return [{"index": full_index(self.names[name]["shape"]), "flat": None, "step": float(st["step"]),
                 **{k: st[k] for k in MOMENTS}}]

    def _optim_by_name(self) -> dict[str, dict]:
        saved = _load_mmap(self.dir, "optimizer.pt")
        order = single_process_param_order(self.config)
        positions = [i for g in saved["param_groups"] for i in g["params"]]
        if len(positions) != len(order):
            raise ValueError(f"{self.dir!r}/optimizer.pt has {len(positions)} parameters but the model "
                             f"of its config.yaml has {len(order)}")
        return {name: saved["state"][i] for name, i in zip(order, positions) if i in saved["state"]}

    def rng(self, rank: int) -> dict | None:
        return self.trainer_state().get("rng") if rank == 0 else None


class LazyRows:
    """A stored tensor that reads, when indexed, only the rows of its first dim asked for."""

    def __init__(self, reader: SafetensorsFile, name: str):
        self.reader, self.name = reader, name
        self.shape = torch.Size(reader.shape(name))
        self.dtype = reader.dtype(name)
        self._rows: tuple[int, int, torch.Tensor] | None = None   # the last rows read

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if not index or not self.shape:
            return self.reader.read(self.name)[index]
        a, b, _ = index[0].indices(self.shape[0])
        if self._rows is None or self._rows[:2] != (a, b):
            # the blocks of one slice share their rows (e.g. the gate and up halves of w_gate_up)
            self._rows = (a, b, self.reader.read(self.name, (a, b)))
        return self._rows[2][(slice(None),) + index[1:]]


class WeightsSource(Source):
    """Read side of a model-only checkpoint (weights.py): whole tensors stored in safetensors
    files; pieces are LazyRows, so a slice reads only its rows."""

    def __init__(self, ckpt_dir: str, meta: dict):
        super().__init__(ckpt_dir)
        self.meta = meta
        self.names = {n: {"shape": i["shape"], "dtype": i["dtype"]} for n, i in meta["tensors"].items()}
        self._readers: dict[str, SafetensorsFile] = {}
        self.bytes_read = 0          # over all files, also those released
        self.largest_read = 0

    def _reader(self, fname: str) -> SafetensorsFile:
        if fname not in self._readers:
            files.verify_file(self.dir, fname)     # its size as COMPLETE lists it
            try:
                self._readers[fname] = SafetensorsFile(os.path.join(self.dir, fname))
            except (OSError, ValueError) as err:
                raise files.CheckpointError(f"checkpoint file {os.path.join(self.dir, fname)} is "
                                            f"unreadable ({err})") from None
        return self._readers[fname]

    def weight_pieces(self, name: str):
        info = self.meta["tensors"][name]
        return [(full_index(info["shape"]), None, LazyRows(self._reader(info["file"]), name))]

    def weights(self, name: str, index, dtype=None) -> torch.Tensor:
        """As Source.weights; a whole tensor is read straight into its result (no second copy:
        streaming converters read whole tensors)."""
        found = self._candidates(name)
        if found and as_index(index) == full_index(self.names[found[0]]["shape"]):
            info = self.meta["tensors"][found[0]]
            t = self._reader(info["file"]).read(found[0])
            return t if dtype is None else t.to(dtype)
        return super().weights(name, index, dtype)

    def optim_pieces(self, name: str) -> list[dict]:
        return []

    def rng(self, rank: int) -> dict | None:
        return self.trainer_state().get("rng") if rank == 0 else None

    def read_stats(self) -> tuple[int, int]:
        """(bytes read, largest single read) so far."""
        live = list(self._readers.values())
        return (self.bytes_read + sum(r.bytes_read for r in live),
                max([self.largest_read] + [r.largest_read for r in live]))

    def release(self) -> None:
        self.bytes_read, self.largest_read = self.read_stats()
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def single_process_param_order(config: dict) -> list[str]:
    """Parameter names in the order a single-process optimizer (training.optim) holds them."""
    from megamoe.config import ModelConfig, from_dict
    from megamoe.model.transformer import Transformer
    from megamoe.training.optim import param_groups

    if not config.get("model"):
        raise ValueError("the checkpoint has no config.yaml with a model section")
    with torch.device("meta"):
        model = Transformer(from_dict(ModelConfig, config["model"], where="model."))
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]


def open_source(ckpt_dir: str) -> Source:
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"checkpoint {ckpt_dir!r} does not exist")
    meta_path = os.path.join(ckpt_dir, META)
    meta = files.read_json(meta_path, "checkpoint file", files.CheckpointError)
    if meta is not None and meta.get("format") == WEIGHTS_FORMAT:
        if meta.get("version", 0) > WEIGHTS_VERSION:
            raise ValueError(f"{meta_path!r} is a megamoe-weights checkpoint of a newer version")
        return WeightsSource(ckpt_dir, meta)
    if meta is not None or os.path.isfile(os.path.join(ckpt_dir, "model_rank0.pt")):
        return ShardedSource(ckpt_dir, meta)
    if os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        return SingleSource(ckpt_dir)
    raise ValueError(f"{ckpt_dir!r} is not a megamoe checkpoint (no metadata.json, model_rank0.pt or model.pt)")


__all__ = ["FORMAT", "VERSION", "META", "MOMENTS", "TIED", "WEIGHTS_FORMAT", "WEIGHTS_VERSION", "Source",
           "ShardedSource", "SingleSource", "WeightsSource", "LazyRows",
           "open_source", "single_process_param_order"]
