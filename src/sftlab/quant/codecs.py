"""Weight codecs for a frozen base: NF4 (QLoRA's 4-bit NormalFloat, blockwise absmax, optional double quantisation
of the scales) and int8 (one absmax scale per output row). Pure PyTorch, so they run on CPU and CUDA alike.

NF4 (Dettmers et al. 2023, QLoRA §3): a weight matrix is cut into blocks of 64 consecutive elements (row-major);
each block is divided by its absmax c_b and every value is rounded to the nearest of 16 code values (quantiles of
N(0, 1) scaled to [-1, 1], with an exact 0). Two 4-bit codes share a byte: 0.5 byte per weight. Double quantisation
stores the fp32 block scales as int8: the scales' mean is subtracted and each run of 256 scales gets its own absmax
factor, so a scale costs 8 + 32/256 bits instead of 32. The code book and the double-quantisation arithmetic are
torchao's `NF4Tensor` (torchtune's QLoRA) exactly, so both give the same codes (tested when torchao is installed).

Error bound of one weight w in block b: |w - ŵ| <= c_b·g/2 + e_b, where g = 1 - 0.7230 is the widest gap of the
code book and e_b the error of the block's (double-quantised) scale: 0 without double quantisation, at most
a_s/128 with it (a_s: the absmax of the mean-subtracted scales of its 256-run). int8: |w - ŵ| <= c_row/254.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # elements per NF4 absmax block (QLoRA, bitsandbytes, torchao)
SCALE_BLOCK = 256  # scales per double-quantisation block

# The 16 NF4 values (QLoRA appendix E), as torchao's NF4Tensor writes them (4 decimals).
NF4_CODE = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)  # fmt: skip
NF4_MAX_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))


def _code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2): the two code values a byte holds (high nibble first), so decoding is one table lookup per byte
    (a (65536, 4) table over byte pairs measured no faster on CPU)."""
    table = _PAIR_TABLES.get(device)
    if table is None:
        code = _code(device)
        b = torch.arange(256, device=device)
        table = _PAIR_TABLES[device] = torch.stack([code[b >> 4], code[b & 15]], dim=1)
    return table


@dataclass
class NF4Weight:
    """One NF4 matrix: packed codes, block scales (fp32, or int8 + per-256 factors + mean), and its shape."""

    codes: torch.Tensor  # uint8 (ceil(numel/64)*32,): two codes a byte, blocks of 64 zero-padded at the end
    scales: torch.Tensor  # fp32 (n_blocks,) | int8 (n_blocks padded to 256,) with double quantisation
    factors: torch.Tensor | None  # fp32 (n_scale_blocks,): int8 -> centred scale multiplier inverse
    mean: torch.Tensor | None  # fp32 (): the scales' mean, added back
    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        if self.factors is not None:
            out |= {"factors": self.factors, "mean": self.mean}
        return out


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    """w flattened, zero-padded to a multiple of `size`, as (n, size) fp32."""
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size)


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scales (n,) -> (int8 (n padded to 256,), factors (n_runs,), mean ()), torchao's arithmetic."""
    mean = absmax.mean()
    centred = _blocks(absmax - mean, SCALE_BLOCK)  # (n_runs, 256); padding is 0 and quantises to 0
    run_max = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    factors = 256 / (2 * run_max)  # (n_runs,)
    q = (centred * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q.reshape(-1), factors, mean


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every 64-block, as the decoder uses it (double-quantised scales expanded)."""
    n_blocks = q.codes.numel() // (BLOCK // 2)
    if q.factors is None:
        return q.scales
    runs = q.scales.view(-1, SCALE_BLOCK).float() / q.factors[:, None]
    return (runs.reshape(-1)[:n_blocks] + q.mean).float()


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, double_quant: bool = True) -> NF4Weight:
    """NF4 codes of a 2-D weight: per 64-block absmax, nearest code value (ties to the lower one, as argmin)."""
    blocks = _blocks(w, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = _code(w.device)
    mids = (code[1:] + code[:-1]) / 2  # (15,) decision boundaries
    idx = torch.bucketize(scaled, mids).to(torch.uint8).view(-1, 2)  # (n/2, 2)
    codes = (idx[:, 0] << 4) | idx[:, 1]
    if double_quant:
        scales, factors, mean = _double_quantize(absmax)
        return NF4Weight(codes, scales, factors, mean, tuple(w.shape))
    return NF4Weight(codes, absmax, None, None, tuple(w.shape))


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (d_out, d_in) matrix an NF4Weight stands for: one byte-pair lookup, one multiply by the block scale."""
    vals = torch.nn.functional.embedding(q.codes.int(), _pair_table(q.codes.device))  # (n/2, 2)
    vals = vals.view(-1, BLOCK).mul_(block_scales(q)[:, None])  # (n_blocks, 64)
    numel = q.shape[0] * q.shape[1]
    return vals.view(-1)[:numel].view(q.shape).to(dtype)


@dataclass
class Int8Weight:
    """One int8 matrix: codes (d_out, d_in) and one fp32 absmax/127 scale per output row."""

    codes: torch.Tensor
    scales: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales}


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (d_out,)
    codes = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scales)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.codes.float() * q.scales[:, None]).to(dtype)


def nf4_error_bound(w: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """Per-element bound on |w - dequantize_nf4(q)| (see the module doc), shaped like w."""
    blocks = _blocks(w, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scale_err = (block_scales(q) - absmax).abs()  # 0 without double quantisation
    bound = absmax * NF4_MAX_GAP / 2 + scale_err  # (n_blocks,)
    numel = w.numel()
    return bound[:, None].expand(-1, BLOCK).reshape(-1)[:numel].view(w.shape)
