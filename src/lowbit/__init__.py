"""lowbit: quantize PyTorch models to INT8/INT4 that run on real integer kernels.

Example:
    >>> import torch, lowbit
    >>> spec = lowbit.QuantSpec(bits=8)
    >>> q, scale, zp = lowbit.ops.quantize_tensor(torch.tensor([0.5, -1.0]), spec)
    >>> q.tolist()
    [64, -127]
"""

from lowbit import ops
from lowbit.config import QuantizationConfig, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "QuantSpec",
    "QuantizationConfig",
    "__version__",
    "ops",
]
