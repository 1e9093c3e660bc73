"""`megamoe plan`: memory, time and communication of a parallel layout, before launching it.

  constants.py   every hardware / efficiency constant (calibratable)
  layouts.py     PlanLayout, enumeration, validity (the project's own checks)
  params.py      parameters, gradients, optimizer state per rank (exact)
  pipesim.py     the pipeline schedule executed on a clock: bubble, in-flight micro-batches (exact)
  comm.py        bytes per collective (EP all-to-all exact for a balanced router), links
  memory.py      per-GPU memory breakdown (state exact, activations a model)
  timing.py      step time (a model: roofline per GEMM class + communication + bubble)
  report.py      evaluate / rank / print;  cli.py: `python -m megamoe plan`
"""
