"""Block-quantized FP8 checkpoints (DeepSeek-V3's release format): dequantization on import.

A quantized linear weight W [out, in] is stored as `name` (float8_e4m3fn) plus `name_scale_inv`
(fp32, [ceil(out / bo), ceil(in / bi)]), one scale per bo x bi block (the edge blocks cropped):
    W[i, j] = float(W_fp8[i, j]) * scale_inv[i // bo, j // bi]
config.json says so: "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [bo, bi]}. Tensors without a `_scale_inv` companion (norms, the router,
embeddings) are stored unquantized and pass through unchanged.

`DequantizedTensors` wraps a checkpoint reader (megamoe.hf.io.HFTensors or the converter's dict
view) so the converter sees plain weights and never the `_scale_inv` tensors.
"""

from __future__ import annotations

import math

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_block_size(hf_config: dict | None) -> tuple[int, int] | None:
    """(bo, bi) of a block-quantized FP8 checkpoint's config.json, None if not quantized;
    a ValueError for quantization schemes megamoe cannot read."""
    q = (hf_config or {}).get("quantization_config")
    if not q:
        return None
    method, block = q.get("quant_method"), q.get("weight_block_size")
    if method != "fp8" or not block or len(block) != 2:
        raise ValueError(f"quantization_config {q} is not supported (only fp8 with weight_block_size, "
                         "DeepSeek-V3's format)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"fp8 format {q.get('fmt')!r} is not supported (e4m3 only)")
    return int(block[0]), int(block[1])


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """weight [out, in] (fp8) * scale_inv [ceil(out/bo), ceil(in/bi)] expanded over the blocks."""
    out, inp = weight.shape
    bo, bi = block
    expected = (math.ceil(out / bo), math.ceil(inp / bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a [{out}, {inp}] "
                         f"weight in {bo}x{bi} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (weight.float() * scale).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale_inv) with each block scaled to the fp8 range (amax -> 448), as
    DeepSeek's quantizer; the inverse of `dequantize_block_fp8` up to fp8 rounding."""
    out, inp = weight.shape
    bo, bi = block
    w = weight.float()
    pad = torch.zeros(math.ceil(out / bo) * bo, math.ceil(inp / bi) * bi)
    pad[:out, :inp] = w
    blocks = pad.view(pad.shape[0] // bo, bo, pad.shape[1] // bi, bi)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)              # [nbo, nbi]
    q = (blocks / scale[:, None, :, None]).view_as(pad)[:out, :inp].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


class DequantizedTensors:
    """A checkpoint reader whose FP8 weights read back dequantized (to `dtype`) and whose
    `_scale_inv` companions are hidden."""

    def __init__(self, tensors, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16):
        self._t, self.block, self.dtype_ = tensors, block, dtype

    def keys(self):
        return [k for k in self._t.keys() if not k.endswith(SCALE_SUFFIX)]

    def __contains__(self, name):
        return not name.endswith(SCALE_SUFFIX) and name in self._t

    def __getitem__(self, name):
        t = self._t[name]
        scale = name + SCALE_SUFFIX
        if scale not in self._t:
            if t.dtype == torch.float8_e4m3fn:
                raise ValueError(f"fp8 tensor {name!r} has no {SCALE_SUFFIX} companion")
            return t
        return dequantize_block_fp8(t, self._t[scale], self.block, self.dtype_)

    def dtype(self, name) -> torch.dtype:
        """The dtype `self[name]` will have (without reading it)."""
        return self.dtype_ if name + SCALE_SUFFIX in self._t else self._t.dtype(name)

    def rename(self, old, new):
        self._t.rename(old, new)
        if old + SCALE_SUFFIX in self._t:
            self._t.rename(old + SCALE_SUFFIX, new + SCALE_SUFFIX)

    def release(self) -> None:
        if hasattr(self._t, "release"):
            self._t.release()
