"""dqgen: a compiler for grouped INT8/INT4 (de)quantization kernels.

Descriptors are validated, lowered to a schedule, rendered from Jinja2 templates into C
(OpenMP + SIMD) or CUDA, built once and cached on disk, and run behind Plan objects or
plain functions.
"""

from .version import __version__

from .errors import (CacheError, CompileError, CudaDriverError, DqgenError,  # noqa: E402
                     InvalidProblemError, MissingKernelError, UnsupportedError)
from .ir import (DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor,  # noqa: E402
                 DType, QuantizePerGroupBackwardDescriptor, QuantizePerGroupDescriptor)
from .plans import (DequantizePerGroupArgs, DequantizePerGroupBackwardArgs,  # noqa: E402
                    DequantizePerGroupBackwardPlan, DequantizePerGroupPlan, KernelSku,
                    PlanPreference, PrecisionGuarantee, QuantizePerGroupArgs,
                    QuantizePerGroupBackwardArgs, QuantizePerGroupBackwardPlan,
                    QuantizePerGroupPlan)
from .bundle import BundleError, load_bundle  # noqa: E402
from .output_pool import release_cached_outputs  # noqa: E402
from .api import (choose_qparams_per_group, dequantize_per_group,  # noqa: E402
                  dequantize_per_group_backward, quantize_per_group,
                  quantize_per_group_backward)

__all__ = [
    "__version__", "DType",
    "DqgenError", "InvalidProblemError", "UnsupportedError", "CompileError", "CacheError",
    "MissingKernelError", "CudaDriverError",
    "DequantizePerGroupDescriptor", "QuantizePerGroupDescriptor",
    "DequantizePerGroupBackwardDescriptor", "QuantizePerGroupBackwardDescriptor",
    "DequantizePerGroupArgs", "QuantizePerGroupArgs", "DequantizePerGroupBackwardArgs",
    "QuantizePerGroupBackwardArgs",
    "DequantizePerGroupPlan", "QuantizePerGroupPlan", "DequantizePerGroupBackwardPlan",
    "QuantizePerGroupBackwardPlan", "PlanPreference", "PrecisionGuarantee", "KernelSku",
    "dequantize_per_group", "quantize_per_group", "dequantize_per_group_backward",
    "quantize_per_group_backward", "choose_qparams_per_group",
    "load_bundle", "BundleError", "release_cached_outputs",
]
