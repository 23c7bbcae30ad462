"""The plain functions' memo of calls they have served: a repeat skips the work in front of
the kernel.

A plain function parses its arguments, flattens and converts arrays, builds and validates
a descriptor, selects a plan and names its outputs: about 10 us, five to ten times the
kernel call itself on a small tensor (a decoding step calls it hundreds of times a
token). When a call's numpy arrays needed none of that (each already what the kernel
takes), the function remembers its plan under the call's signature: the arrays' types,
dtypes and shapes and every other argument by value and type. A later call with the same
signature runs that plan at once; the plan still checks what the signature does not say
(contiguity, alignment, writability, overlap) and refuses, and the function then takes
its full path, which names the problem in the caller's terms.
"""

from __future__ import annotations

import numpy as np

#: Signatures remembered per function: enough for a model's layer shapes, bounded.
SIZE = 256


def signature(arrays: tuple, others: tuple) -> tuple | None:
    """A call's signature, or None when an array is not exactly a numpy array or None
    (torch tensors, buffers and subclasses take the full path)."""
    key = []
    for arr in arrays:
        if arr is None:  # an output not given
            key.append(None)
        elif type(arr) is np.ndarray:
            key.append(arr.dtype)
            key.append(arr.shape)
        else:
            return None
    return (*key, *others, *map(type, others))


class CallMemo:
    """Plans by call signature, the oldest dropped first past ``SIZE``."""

    def __init__(self) -> None:
        self._plans: dict = {}

    def get(self, key):
        if key is None:
            return None
        try:
            return self._plans.get(key)
        except TypeError:  # an unhashable argument
            return None

    def remember(self, key, plan) -> None:
        if key is None:
            return
        try:
            if len(self._plans) >= SIZE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        except TypeError:  # an unhashable argument: such calls are never remembered
            pass

