"""Parallelism applied from outside the plain model (see ../../shared/DESIGN.md, "Parallel layout").

mesh.py         rank grid -> named process groups (tp, dp, pp, dp_tp, ep, etp, edp, embed)
collectives.py  differentiable collectives with an explicit group
tensor.py       column / row parallel linears, vocab-parallel embedding and cross-entropy
expert.py       all-to-all MoE dispatcher, expert-weight sharding
params.py       per-parameter spec: gradient reduction group, global shape + slice
parallelize.py  apply_tp, apply_ep (fixed order), parallelize_model
pipeline.py     apply_pp (stage partition), 1F1B / interleaved schedules, p2p executor
pipeline_runner.py  what the trainer runs instead of its micro-batch loop when pp > 1
data.py         gradient reduction, global grad norm, ZeRO-1 optimizer
launch.py       torchrun / Slurm environment, init_process_group
guard.py        collective timeouts that name the stuck process group
agree.py        rank agreement at startup (config / data fingerprints), max over ranks
context.py      ParallelContext (the trainer's `ctx`; LocalContext is its one-process twin)
setup.py        the parallel steps of megamoe.training.build.build_training: mesh, PP/TP/EP,
                pipeline runner, data parallel (gradient reduction or ZeRO-1)
"""
