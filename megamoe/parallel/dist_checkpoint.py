"""Sharded checkpoints of parallel runs that load into any layout (resharding) or one process.

On disk (one atomic directory, as in megamoe.training.checkpoint):
  step_XXXXXXXX/model_rank{r}.pt  {"model": {name: local shard}, "specs": {name: ParamSpec dict}}
               /optim_rank{r}.pt  {"optim": {name: piece}, "rng": rank r's RNG state}
               /metadata.json     format, layout, {name: global shape, dtype, model_ranks,
                                  optim_ranks}: which rank files hold which name
               /trainer.pt, config.yaml                  (rank 0)
Names are the global single-process names (`layers.3.ffn.experts.w_gate_up`, pipeline stages
keep them); a spec's index lists the ranges of the global tensor the local shard holds
(megamoe.parallel.params). An optimizer piece is {"index", "flat", "step", "exp_avg",
"exp_avg_sq"[, "master"]}: the AdamW state of the local shard `index`, whole (flat None) or,
under ZeRO-1, the range [a, b) of its flattened elements that this rank's slice of the flat
buffer covers. Flat pieces rather than an all-gather over the bucket group before saving: no
collective and no extra memory at save time, no duplicate bytes on disk; the loader joins
the pieces of one local shard (written by the ranks of one bucket group) before placing it.
Only one copy of a replicated tensor is written (the first replica; DP copies add no bytes),
and masters only where they differ from the params (ZeRO-1 with non-fp32 params).

Loading: for every local parameter each rank assembles exactly its slice of the global tensor
from the pieces overlapping it (rank files opened with mmap, only those metadata.json lists
for the name), for the weights, the moments and the masters; so any layout works (TP/EP/ETP/DP/ZeRO/pipeline
split, or one process), and a single-process checkpoint (model.pt + optimizer.pt) is a source
too. Tied embeddings: a name the checkpoint lacks is read from its tied partner (embed.weight
<-> lm_head.weight), which covers the head's own copy on the last pipeline stage.
RNG: rank r takes saved rank r's state when there is one (exact when the layout is unchanged),
other ranks keep theirs. Hyperparameters (lr, betas, ...) come from the resuming run's config.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from megamoe.parallel.params import full_index, get_spec
from megamoe.training import checkpoint as ckpt

FORMAT, VERSION, META = "megamoe-sharded", 1, "metadata.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
TIED = {"embed.weight": "lm_head.weight", "lm_head.weight": "embed.weight"}

Index = tuple[tuple[tuple[int, int], ...], ...]
Piece = tuple[Index, "list[int] | None", torch.Tensor]    # (index, flat range or None, data)


# ------------------------------------------------------------------------------ slice assembly

def as_index(index) -> Index:
    return tuple(tuple((int(a), int(b)) for a, b in ranges) for ranges in index)


def index_shape(index) -> tuple[int, ...]:
    return tuple(sum(b - a for a, b in ranges) for ranges in index)


def _segments(dst: tuple, src: tuple) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, length) of the global positions both hold, one dim."""
    out, s_off = [], 0
    for sa, sb in src:
        d_off = 0
        for da, db in dst:
            lo, hi = max(sa, da), min(sb, db)
            if lo < hi:
                out.append((s_off + lo - sa, d_off + lo - da, hi - lo))
            d_off += db - da
        s_off += sb - sa
    return out


def copy_overlap(dst: torch.Tensor, covered: torch.Tensor, dst_index: Index, src: torch.Tensor,
                 src_index: Index) -> None:
    """dst[what both hold] = src[...]: rectangular block copies (a handful: ranges are few)."""
    per_dim = [_segments(d, s) for d, s in zip(dst_index, src_index)]
    for blocks in itertools.product(*per_dim):
        d = tuple(slice(o, o + n) for _, o, n in blocks)
        dst[d] = src[tuple(slice(o, o + n) for o, _, n in blocks)]
        covered[d] = True


def _join_flat(parts: list[tuple[tuple[int, int], torch.Tensor]], shape, what: str) -> torch.Tensor:
    """One local shard from the flat ranges of it that the ranks of a ZeRO-1 group wrote."""
    out = torch.empty(math.prod(shape), dtype=parts[0][1].dtype)
    end = 0
    for (a, b), data in sorted(parts, key=lambda x: x[0]):
        if a > end:
            break
        out[a:b] = data.reshape(-1)
        end = max(end, b)
    if end < out.numel():
        raise ValueError(f"the checkpoint lacks part of the ZeRO-1 state of {what}; is a rank file missing?")
    return out.view(shape)


def assemble(pieces: Iterable[Piece], index, dtype: torch.dtype | None, what: str) -> torch.Tensor | None:
    """The slice `index` of a global tensor from saved pieces; None when there are no pieces."""
    index = as_index(index)
    shape = index_shape(index)
    out = covered = None
    flat_groups: dict[Index, list] = {}
    for src_index, flat, data in pieces:
        src_index = as_index(src_index)
        if out is None:
            out = torch.empty(shape, dtype=dtype or data.dtype)
            covered = torch.zeros(shape, dtype=torch.bool)
        if not all(_segments(d, s) for d, s in zip(index, src_index)):
            continue   # no overlap with the wanted slice
        if flat is not None:
            flat_groups.setdefault(src_index, []).append(((int(flat[0]), int(flat[1])), data))
        elif tuple(data.shape) != index_shape(src_index):
            raise ValueError(f"a saved shard of {what} has shape {tuple(data.shape)} but its spec "
                             f"says {index_shape(src_index)}; the checkpoint is corrupt")
        else:
            copy_overlap(out, covered, index, data, src_index)
    for src_index, parts in flat_groups.items():
        copy_overlap(out, covered, index, _join_flat(parts, index_shape(src_index), what), src_index)
    if out is not None and not bool(covered.all()):
        raise ValueError(f"the checkpoint does not cover all of {what}; is a rank file missing?")
    return out


# ------------------------------------------------------------------------------------ sources

def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _load_mmap(ckpt_dir: str, fname: str):
    path = os.path.join(ckpt_dir, fname)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {ckpt_dir!r} has no {fname}; is a file missing?")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


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
        return dict(ckpt.load_file(self.dir, "trainer.pt"))

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
    def __init__(self, ckpt_dir: str):
        super().__init__(ckpt_dir)
        self._files: dict[str, dict] = {}
        path = os.path.join(ckpt_dir, META)
        self.legacy = not os.path.isfile(path)
        if self.legacy:
            self.meta = self._scan_model_files()
        else:
            with open(path) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != FORMAT or self.meta.get("version", 0) > VERSION:
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
        self.model = _load_mmap(ckpt_dir, "model.pt")
        self.names = {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in self.model.items()}
        self._optim: dict[str, dict] | None = None

    def weight_pieces(self, name: str) -> list[Piece]:
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
    if os.path.isfile(os.path.join(ckpt_dir, META)) or os.path.isfile(os.path.join(ckpt_dir, "model_rank0.pt")):
        return ShardedSource(ckpt_dir)
    if ckpt.is_single_process(ckpt_dir):
        return SingleSource(ckpt_dir)
    raise ValueError(f"{ckpt_dir!r} is not a megamoe checkpoint (no metadata.json, model_rank0.pt or model.pt)")


# --------------------------------------------------------------------------------- model side

def _parts(model) -> list[nn.Module]:
    """A model, or a list of modules holding disjoint global names."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def local_params(model) -> list[tuple[str, nn.Parameter, list[str]]]:
    """(name, param, all its names): a tied param has several names (embed + lm_head)."""
    by_id: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for part in _parts(model):
        for n, p in part.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), (p, []))[1].append(n)
    return [(names[0], p, names) for p, names in by_id.values()]


def local_buffers(model) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers (e.g. the router's expert bias): full copies on every rank."""
    out = []
    for part in _parts(model):
        params = {n for n, _ in part.named_parameters(remove_duplicate=False)}
        out += [(n, t) for n, t in part.state_dict(keep_vars=True).items() if n not in params]
    return out


def _first_copy(p: torch.Tensor, coords) -> bool:
    """Whether this rank writes p: the first of its replicas (a tied head copy, which does not
    count in the gradient norm, is still written: a pipeline target may need it)."""
    group = get_spec(p).replica_group
    if group == "edp":
        return coords.edp == 0
    if group == "dp":
        return coords.dp == 0
    return coords.dp == 0 and coords.tp == 0


def _cpu(t):
    """A CPU tensor owning exactly its data: torch.save writes whole storages, and under ZeRO-1
    params are views of one flat buffer. Tensors already owning theirs are not copied."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().cpu()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _model_file(model, coords) -> dict:
    tensors, specs = {}, {}
    for _, p, names in local_params(model):
        if _first_copy(p, coords):
            t = _cpu(p)
            for n in names:
                tensors[n], specs[n] = t, get_spec(p).to_dict()
    if coords.dp == 0 and coords.tp == 0:
        tensors.update((n, _cpu(b)) for n, b in local_buffers(model))
    return {"model": tensors, "specs": specs}


def _plain_pieces(optimizer, params) -> dict[str, dict]:
    out = {}
    for name, p, _ in params:
        st = optimizer.state.get(p, {})
        if all(k in st for k in MOMENTS):
            out[name] = {"flat": None, "step": float(st["step"]), **{k: st[k] for k in MOMENTS}}
    return out


def _optim_file(model, optimizer, coords) -> dict[str, dict]:
    params = local_params(model)
    if hasattr(optimizer, "param_state_pieces"):      # ZeRO-1: this rank's flat slices
        pieces = optimizer.param_state_pieces()

        def keep(p):  # the TP ranks' buckets hold the same slices of full TP copies
            return get_spec(p).replica_group != "dp_tp" or coords.tp == 0
    else:
        pieces = _plain_pieces(optimizer, params)

        def keep(p):
            return _first_copy(p, coords)
    return {name: {**{k: _cpu(v) for k, v in pieces[name].items()}, "index": get_spec(p).to_dict()["index"]}
            for name, p, _ in params if name in pieces and keep(p)}


# --------------------------------------------------------------------------------------- save

def _entries(model, in_model: set[str], in_optim: set[str]) -> dict[str, list]:
    """This rank's part of metadata.json: name -> [global shape, dtype, in model file, in optim file]."""
    out = {}
    for _, p, names in local_params(model):
        for n in names:
            out[n] = [list(get_spec(p).global_shape), _dtype_name(p.dtype), n in in_model, n in in_optim]
    for n, b in local_buffers(model):
        out[n] = [list(b.shape), _dtype_name(b.dtype), n in in_model, False]
    return out


def _metadata(gathered: list[dict], layout: dict) -> dict:
    tensors: dict[str, dict] = {}
    for r, entries in enumerate(gathered):
        for name, (shape, dtype, in_model, in_optim) in entries.items():
            info = tensors.setdefault(name, {"shape": shape, "dtype": dtype, "model_ranks": [], "optim_ranks": []})
            assert info["shape"] == shape, f"ranks disagree on the global shape of {name}"
            if in_model:
                info["model_ranks"].append(r)
            if in_optim:
                info["optim_ranks"].append(r)
    assert all(i["model_ranks"] for i in tensors.values()), "a tensor no rank wrote"
    return {"format": FORMAT, "version": VERSION, "world_size": len(gathered), "layout": layout,
            "tensors": tensors}


def save(out_dir: str, step: int, model, optimizer, mesh, trainer_state: dict, config: dict,
         layout: dict) -> str:
    """Write checkpoint `step` of a parallel run; every rank calls it. Returns its path.
    Rank 0 makes a temporary directory, every rank writes its files, rank 0 renames it after
    a barrier and points `latest` at it: a crash leaves the previous checkpoint latest."""
    root, name, rank = os.path.join(out_dir, ckpt.CKPT_DIR), f"step_{step:08d}", mesh.rank
    tmp = os.path.join(root, f".{name}.tmp")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        ckpt.remove_stale_temps(root)
        os.makedirs(tmp)
    dist.barrier()
    # One file's host copies at a time.
    model_file = _model_file(model, mesh.coords)
    ckpt.save_file(tmp, f"model_rank{rank}.pt", model_file)
    in_model = set(model_file["model"])
    del model_file
    optim = _optim_file(model, optimizer, mesh.coords)
    ckpt.save_file(tmp, f"optim_rank{rank}.pt", {"optim": optim, "rng": ckpt.rng_state()})
    in_optim = set(optim)
    del optim
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(_entries(model, in_model, in_optim), gathered, dst=0)
    if rank == 0:
        ckpt.save_file(tmp, "trainer.pt", trainer_state)
        ckpt.write_config(tmp, config)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(_metadata(gathered, layout), f)
            f.flush()
            os.fsync(f.fileno())
    dist.barrier()     # every rank's files are complete before the rename publishes them
    if rank == 0:
        ckpt.publish(root, tmp, name)
    dist.barrier()
    return os.path.join(root, name)


# --------------------------------------------------------------------------------------- load

def _mismatch(source: Source, name: str, shape: tuple) -> list[str]:
    if not source.has(name):
        return [f"checkpoint {source.dir!r} has no tensor {name!r}; was it saved from another model config?"]
    saved = source.global_shape(name)
    if saved != tuple(shape):
        return [f"checkpoint {source.dir!r} holds {name!r} with shape {saved} but this model's is "
                f"{tuple(shape)}; the model configs differ"]
    return []


def _validate(source: Source, params, buffers, mesh) -> None:
    """Raise the same ValueError on every rank, before any collective, if the checkpoint does
    not fit this model: a tensor missing or of another shape, or one no rank holds."""
    mine, problems = set(), []
    for _, p, names in params:
        mine.update(names)
        problems += _mismatch(source, names[0], get_spec(p).global_shape)
    for name, b in buffers:
        mine.add(name)
        problems += _mismatch(source, name, b.shape)
    saved = sorted(source.names)
    held = [n in mine for n in saved]
    if mesh is not None and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (bytes(held), problems[:1]))   # pipeline stages hold subsets
        held = [any(h) for h in zip(*(hs for hs, _ in everyone))]
        problems = [p for _, ps in everyone for p in ps]
    extra = [n for n, h in zip(saved, held) if not h]
    if extra:
        problems.append(f"checkpoint {source.dir!r} has {extra[0]!r} (and {len(extra) - 1} more) that "
                        "this model lacks; was it saved from another model config?")
    if problems:
        raise ValueError(problems[0])


def _load_optimizer(source: Source, params, optimizer) -> None:
    def fetch(name: str, p: torch.Tensor) -> dict | None:
        return source.optim_state(name, get_spec(p).index)

    if hasattr(optimizer, "load_param_state"):        # ZeRO-1: each rank takes its flat slices
        optimizer.load_param_state(fetch)
        return
    name_of = {id(p): name for name, p, _ in params}
    saved = optimizer.state_dict()      # positions + this run's hyperparameters
    state = {}
    for group, packed in zip(optimizer.param_groups, saved["param_groups"]):
        for p, i in zip(group["params"], packed["params"]):
            st = fetch(name_of[id(p)], p) if id(p) in name_of else None
            if st is not None:
                state[i] = {"step": torch.tensor(st["step"]), **{k: st[k] for k in MOMENTS}}
    saved["state"] = state
    optimizer.load_state_dict(saved)    # casts and places the state like the optimizer wants it


def load(ckpt_dir: str, model, optimizer, mesh=None) -> dict:
    """Load any megamoe checkpoint into this rank's model + optimizer, whatever the layouts
    (collective under a mesh: every rank calls it). Returns the trainer state (step,
    bad_steps, rng) for Trainer.load_trainer_state."""
    source = open_source(ckpt_dir)
    if source.legacy:
        raise ValueError(f"{ckpt_dir!r} was written by an older megamoe (no {META}); its optimizer "
                         "state cannot be resharded: resume it with the same layout and version")
    params, buffers = local_params(model), local_buffers(model)
    _validate(source, params, buffers, mesh)
    with torch.no_grad():
        for name, p, _ in params:
            p.copy_(source.weights(name, get_spec(p).index))
        for name, b in buffers:
            b.copy_(source.weights(name, full_index(b.shape)))
    _load_optimizer(source, params, optimizer)
    state = source.trainer_state()
    rng = source.rng(mesh.rank if mesh is not None else 0)
    state["rng"] = rng if rng is not None else ckpt.rng_state()
    return state


# ------------------------------------------------------------------------------ consolidation

def consolidate(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """{name: full tensor} of any megamoe checkpoint (fp32 masters where saved). Holds the whole
    model; with tied embeddings lm_head.weight is embed.weight, as in a single-process model."""
    source = open_source(ckpt_dir)
    full = {name: source.weights(name, full_index(info["shape"])) for name, info in source.names.items()}
    if source.tie and "embed.weight" in full and "lm_head.weight" in full:
        full["lm_head.weight"] = full["embed.weight"]
    return full


__all__ = ["save", "load", "consolidate", "assemble", "copy_overlap", "open_source", "Source",
           "ShardedSource", "SingleSource", "local_params", "single_process_param_order", "META", "MOMENTS"]
