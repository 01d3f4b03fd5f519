"""QuantWeight: a GGUF weight on the device as the planes of layout.py."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from diptych.quant import QuantTensor
from diptych.quant.formats import IQ4_NL_CODEBOOK

from .layout import KERNEL_TYPES, PLANE_ORDER, split_planes


class QuantWeight:
    """A (out, in) weight kept quantized: exactly the GGUF bytes, split into planes."""

    def __init__(self, name: str, ggml_type: QT, shape: tuple[int, int],
                 planes: dict[str, torch.Tensor], lut: torch.Tensor):
        self.name = name
        self.ggml_type = QT(ggml_type)
        self.shape = shape
        self.planes = planes
        self.lut = lut  # IQ4_NL codebook (fp32, 16 values); passed to every kernel, read by one

    @classmethod
    def from_quant_tensor(cls, qt: QuantTensor, device) -> "QuantWeight":
        if qt.ggml_type not in KERNEL_TYPES or len(qt.shape) != 2:
            raise ValueError(f"{qt.name}: no kernel for {qt.type_name} {qt.shape}")
        planes = split_planes(qt.data, qt.ggml_type, qt.shape[1])
        planes = {k: torch.from_numpy(planes[k]).to(device) for k in PLANE_ORDER if k in planes}
        lut = torch.from_numpy(IQ4_NL_CODEBOOK.astype(np.float32)).to(device)
        return cls(qt.name, qt.ggml_type, tuple(qt.shape), planes, lut)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes.values())

    @property
    def layout(self) -> str:
        return f"{self.ggml_type.name} planes ({'+'.join(self.planes)}), Triton dequant in registers"


class QuantExperts:
    """Routed experts kept quantized as one stacked weight (expert e: rows e*rows to
    (e+1)*rows), for kernels that pick experts by id; `experts[e]` is expert e's view."""

    def __init__(self, stacked: QuantWeight, n_experts: int):
        self.stacked = stacked
        self.n_experts = n_experts
        self.rows = stacked.out_features // n_experts

    @classmethod
    def from_quant_tensor(cls, qt: QuantTensor, device) -> "QuantExperts":
        n, rows, cols = qt.shape
        flat = QuantTensor(qt.name, qt.ggml_type, (n * rows, cols), qt.data)
        return cls(QuantWeight.from_quant_tensor(flat, device), n)

    def __len__(self) -> int:
        return self.n_experts

    def __getitem__(self, e: int) -> QuantWeight:
        s = self.stacked
        planes = {k: v[e * self.rows:(e + 1) * self.rows] for k, v in s.planes.items()}
        return QuantWeight(f"{s.name}[{e}]", s.ggml_type, (self.rows, s.in_features), planes,
                           s.lut)

    @property
    def nbytes(self) -> int:
        return self.stacked.nbytes

    @property
    def layout(self) -> str:
        return f"{self.n_experts} experts stacked, {self.stacked.layout}"
