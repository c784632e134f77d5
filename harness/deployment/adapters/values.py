"""Tap values to and from a deployment's own tensors: the conversions every adapter needs once.

The harness judges 2-D float32 ``[tokens, features]`` arrays, heads flattened head-major. A torch
implementation holds bf16 or fp16 tensors shaped ``[1, T, H, D]``, ``[1, H, T, D]`` or ``[1, T, F]``.
``to_tap_array`` turns any of those into the canonical array; ``from_tap_array`` turns what ``tap``
returns (the golden in isolated mode) back into the implementation's dtype, device and layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Layouts of a per-head tensor, batch dimension first when present: b = batch (size 1), t = tokens,
# h = heads, d = head_dim, f = features (already flat).
LAYOUTS = ("tf", "btf", "thd", "bthd", "htd", "bhtd")


def _is_torch(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "dtype") and hasattr(value, "cpu")


def _check_layout(layout: str, ndim: int, name: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"tap {name}: layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if len(layout) != ndim:
        raise ValueError(f"tap {name}: layout {layout!r} needs {len(layout)} dimensions, the value has {ndim}")


def infer_layout(shape: tuple[int, ...], name: str = "value") -> str:
    """The layout of an unannotated value: 2-D is ``tf``; 3-D with batch 1 is ``btf``; 3-D otherwise
    ``thd``; 4-D ``bthd`` (the projection layout of every HF model before its transpose)."""
    ndim = len(shape)
    if ndim == 2:
        return "tf"
    if ndim == 3:
        return "btf" if shape[0] == 1 else "thd"
    if ndim == 4:
        return "bthd"
    raise ValueError(f"tap {name}: cannot read a {ndim}-D value as [tokens, features]; give its layout")


def to_tap_array(value: Any, layout: str | None = None, name: str = "value") -> np.ndarray:
    """``value`` (torch tensor of any float dtype, or NumPy array) as a C-contiguous float32 array
    ``[tokens, features]``; a batch dimension must have size 1."""
    if _is_torch(value):
        import torch

        t = value.detach()
        if not t.is_floating_point():
            raise TypeError(f"tap {name}: dtype {t.dtype} is not a floating-point type")
        arr = t.to(device="cpu", dtype=torch.float32).numpy()
    else:
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise TypeError(f"tap {name}: dtype {arr.dtype} is not a floating-point type")
        arr = arr.astype(np.float32, copy=False)
    layout = layout or infer_layout(arr.shape, name)
    _check_layout(layout, arr.ndim, name)
    if layout.startswith("b"):
        if arr.shape[0] != 1:
            raise ValueError(f"tap {name}: batch dimension {arr.shape[0]}; the harness judges batch 1")
        arr, layout = arr[0], layout[1:]
    if layout == "htd":
        arr = arr.transpose(1, 0, 2)
    return np.ascontiguousarray(arr.reshape(arr.shape[0], -1), dtype=np.float32)


def from_tap_array(array: np.ndarray, like: Any, layout: str | None = None, name: str = "value") -> Any:
    """``array`` ([tokens, features], what ``tap`` returned) in the dtype, device, shape and layout of
    ``like`` (the value the deployment handed over)."""
    shape = tuple(like.shape)
    layout = layout or infer_layout(shape, name)
    core = shape[1:] if layout.startswith("b") else shape
    inner = layout[1:] if layout.startswith("b") else layout
    arr = np.asarray(array, dtype=np.float32)
    if inner == "htd":
        h, t, d = core
        arr = arr.reshape(t, h, d).transpose(1, 0, 2)
    arr = np.ascontiguousarray(arr).reshape(shape)
    if _is_torch(like):
        import torch

        return torch.from_numpy(arr.copy()).to(device=like.device, dtype=like.dtype)
    return arr.astype(like.dtype, copy=False)
