"""GroupedExperts under autocast: the compute-dtype weights are cast once per weight update, not
once per call, with the numbers (outputs and gradients) of a per-call cast."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamoe.moe.experts import GroupedExperts, grouped_gemm


class CastCounter(TorchDispatchMode):
    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.casts = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket.__name__ == "_to_copy" and tuple(args[0].shape) in self.shapes
                and args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16):
            self.casts += 1   # a master-weight cast (the gradients' casts back to fp32 remain)
        return func(*args, **kwargs)


def experts_and_inputs():
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 8, backend="loop")
    with torch.no_grad():
        ex.w_gate_up.normal_(0, 0.1)
        ex.w_down.normal_(0, 0.1)
    xs = [torch.randn(12, 16) for _ in range(3)]
    counts = torch.tensor([3, 0, 5, 4])
    return ex, xs, counts


def per_call_reference(ex, x, counts):
    """What the layer computed before the cache: w.to(bf16) at every call."""
    xb = x.to(torch.bfloat16)
    gate, up = grouped_gemm(xb, ex.w_gate_up.to(torch.bfloat16), counts, "loop").chunk(2, dim=-1)
    return grouped_gemm(torch.nn.functional.silu(gate) * up, ex.w_down.to(torch.bfloat16), counts, "loop")


def test_one_cast_per_weight_update_and_the_same_numbers():
    ex, xs, counts = experts_and_inputs()
    ref = GroupedExperts(4, 16, 8, backend="loop")
    ref.load_state_dict(ex.state_dict())
    counter = CastCounter({tuple(ex.w_gate_up.shape), tuple(ex.w_down.shape)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with counter:
            outs = [ex(x, counts) for x in xs]          # three micro-batches
            sum(o.float().square().sum() for o in outs).backward()
        assert counter.casts == 2                      # once per weight, not 3 x 2
        ref_outs = [per_call_reference(ref, x, counts) for x in xs]
        sum(o.float().square().sum() for o in ref_outs).backward()
    for a, b in zip(outs, ref_outs):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert ex.w_gate_up.grad.dtype == torch.float32
    assert torch.equal(ex.w_gate_up.grad, ref.w_gate_up.grad) and torch.equal(ex.w_down.grad, ref.w_down.grad)


def test_an_in_place_update_refreshes_the_cached_copy():
    ex, xs, counts = experts_and_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = ex(xs[0], counts)
        with torch.no_grad():
            ex.w_down.mul_(2.0)                        # what an optimizer step does
        after = ex(xs[0], counts)
        expected = per_call_reference(ex, xs[0], counts)
    assert torch.equal(after, expected) and not torch.equal(after, before)
