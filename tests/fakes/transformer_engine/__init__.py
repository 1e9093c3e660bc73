"""A stand-in for NVIDIA Transformer Engine, for CPU tests of how megamoe wires FP8 in.

Only what megamoe uses: `pytorch.Linear`, `pytorch.fp8_autocast`, `pytorch.checkpoint`. The
Linear computes like nn.Linear but refuses to run outside `fp8_autocast` while autograd is on,
so a recompute that happens outside the FP8 context (torch's own checkpoint) fails loudly, as
real TE would compute it with other scaling state.
"""
