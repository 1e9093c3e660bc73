"""Sharded checkpoints of parallel runs that load into any layout (resharding) or one process.

On disk (one atomic directory with its COMPLETE marker, see files.py):
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

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe.checkpoint import files, resolve
from megamoe.checkpoint.sources import FORMAT, META, MOMENTS, VERSION, Source, _dtype_name, open_source
from megamoe.parallel.guard import guarded
from megamoe.parallel.params import full_index, get_spec


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
    Rank 0 makes a temporary directory, every rank writes its files, rank 0 publishes it (with
    its COMPLETE marker) after a barrier: a crash leaves the previous checkpoint the newest."""
    root, name, rank = resolve.checkpoints_root(out_dir), resolve.step_name(step), mesh.rank
    tmp = os.path.join(root, f".{name}.tmp")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        files.remove_stale_temps(root)
        os.makedirs(tmp)
    with guarded():
        dist.barrier()
    # One file's host copies at a time.
    model_file = _model_file(model, mesh.coords)
    files.save_file(tmp, f"model_rank{rank}.pt", model_file)
    in_model = set(model_file["model"])
    del model_file
    optim = _optim_file(model, optimizer, mesh.coords)
    files.save_file(tmp, f"optim_rank{rank}.pt", {"optim": optim, "rng": files.rng_state()})
    in_optim = set(optim)
    del optim
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    with guarded():
        dist.gather_object(_entries(model, in_model, in_optim), gathered, dst=0)
    if rank == 0:
        files.save_file(tmp, "trainer.pt", trainer_state)
        files.write_config(tmp, config)
        files.write_json(os.path.join(tmp, META), _metadata(gathered, layout))
    with guarded():
        dist.barrier()     # every rank's files are complete before the rename publishes them
    if rank == 0:
        files.publish(root, tmp, name, step)
    with guarded():
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


def validate_against(source: Source, params, buffers, mesh) -> None:
    """Raise the same ValueError on every rank if the checkpoint does not fit this model: a
    tensor missing or of another shape, or one no rank holds (one all-gather under a mesh)."""
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
        with guarded():
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
    files.verify(ckpt_dir)   # every rank, before any collective: the same one line everywhere
    source = open_source(ckpt_dir)
    if source.legacy:
        raise ValueError(f"{ckpt_dir!r} was written by an older megamoe (no {META}); its optimizer "
                         "state cannot be resharded: resume it with the same layout and version")
    params, buffers = local_params(model), local_buffers(model)
    validate_against(source, params, buffers, mesh)
    with torch.no_grad():
        for name, p, _ in params:
            p.copy_(source.weights(name, get_spec(p).index))
        for name, b in buffers:
            b.copy_(source.weights(name, full_index(b.shape)))
    _load_optimizer(source, params, optimizer)
    state = source.trainer_state()
    rng = source.rng(mesh.rank if mesh is not None else 0)
    state["rng"] = rng if rng is not None else files.rng_state()
    return state


__all__ = ["save", "load", "local_params", "local_buffers", "validate_against"]
