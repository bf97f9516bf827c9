"""Triton kernel tests run on the GPU when there is one, else on CPU tensors under Triton's
interpreter: TRITON_INTERPRET must be set before any kernel is defined (Triton reads it when
`@triton.jit` runs), so it is set here, at collection, before the test modules import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
