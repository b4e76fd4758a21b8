"""Weight quantization numerics: symmetric integer grids, round to nearest and GPTQ, in numpy.

Weights are [..., N, K] (N output rows, K input features); a scale covers a block of K. Levels are stored
unsigned with an offset of half the range (8 for INT4, 128 for INT8), INT4 packed two per byte, low
nibble first: the layout of ONNX Runtime's QMoE and MatMulNBits without zero points.

GPTQ (Frantar et al., 2022) is written here rather than taken from a library: onnxruntime's GPTQ needs
neural-compressor and only covers MatMul nodes, and the experts live in MoE nodes.
"""

from __future__ import annotations

import numpy as np


def top_level(bits: int) -> int:
    """7 or 127: the grid stays symmetric, so the lowest level is unused."""
    return 2 ** (bits - 1) - 1


def block_scales(weight: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """[..., N, K] -> [..., N, K/block]: the largest magnitude of each block maps to the top level."""
    blocks = weight.reshape(*weight.shape[:-1], weight.shape[-1] // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / top_level(bits)
    scales[scales == 0] = 1.0
    return scales.astype(np.float32)


def to_levels(weight: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer levels of `weight` [..., N, K] under per-block `scales` [..., N, K/block]."""
    block_size = weight.shape[-1] // scales.shape[-1]
    expanded = np.repeat(scales, block_size, axis=-1)
    return np.clip(np.round(weight / expanded), -top_level(bits) - 1, top_level(bits)).astype(np.int16)


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Signed levels [..., N, K] -> unsigned bytes [..., N, K*bits/8]."""
    unsigned = (levels + top_level(bits) + 1).astype(np.uint8)
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return np.ascontiguousarray(unsigned)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned bytes [..., N, K*bits/8] -> signed levels [..., N, K] (the inverse of `pack`)."""
    if bits == 4:
        unpacked = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
        unpacked[..., 0::2], unpacked[..., 1::2] = packed & 0x0F, packed >> 4
        packed = unpacked
    return packed.astype(np.int16) - (top_level(bits) + 1)


def dequantize(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    block_size = levels.shape[-1] // scales.shape[-1]
    return (levels * np.repeat(scales, block_size, axis=-1)).astype(np.float32)


def round_to_nearest(weight: np.ndarray, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed levels [..., N, K] and scales [..., N, K/block]."""
    scales = block_scales(weight, block_size, bits)
    return to_levels(weight, scales, bits), scales


def gptq(weight: np.ndarray, hessian: np.ndarray, block_size: int, bits: int, damping: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ: quantize one input feature at a time and spread its error over the features not yet quantized.

    weight [..., N, K]; hessian [..., K, K] = sum of x x^T over calibration inputs x of this weight. Leading
    dimensions (experts) are processed together. A block's scale is taken when its first feature is reached,
    from the weights as updated so far. Returns signed levels and scales like `round_to_nearest`.
    """
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    columns = w.shape[-1]
    diagonal = np.einsum("...ii->...i", h)  # a view: writes go into h
    dead = diagonal == 0  # features never active in calibration: quantize them as they are
    diagonal[dead] = 1.0
    diagonal += damping * diagonal.mean(axis=-1, keepdims=True)
    # Upper Cholesky factor of H^-1: row i holds how the remaining features absorb feature i's error.
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), -1, -2)
    levels = np.empty(w.shape, np.int16)
    scales = np.empty((*w.shape[:-1], columns // block_size), np.float32)
    top = top_level(bits)
    for i in range(columns):
        if i % block_size == 0:
            scales[..., i // block_size] = block_scales(w[..., i : i + block_size], block_size, bits)[..., 0]
        scale = scales[..., i // block_size].astype(np.float64)  # [..., N]
        q = np.clip(np.round(w[..., i] / scale), -top - 1, top)
        levels[..., i] = q
        error = (w[..., i] - q * scale) / upper[..., i, i][..., None]  # [..., N]
        w[..., i + 1 :] -= error[..., None] * upper[..., i, None, i + 1 :]
    return levels, scales


def smoothing_scales(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant (Xiao et al., 2022): per input channel, s = max|x|^alpha / max|w|^(1-alpha).

    Dividing the activations by s and multiplying the weights' input rows by s leaves the product
    unchanged and moves activation outliers into the weights, which quantize per channel.
    """
    scales = activation_max.astype(np.float64) ** alpha / np.maximum(weight_max.astype(np.float64), 1e-8) ** (1 - alpha)
    scales[~np.isfinite(scales) | (scales <= 0)] = 1.0  # channels never active: leave them alone
    return np.clip(scales, 1e-4, 1e4)
