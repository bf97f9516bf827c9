"""Triton kernels, one op per file; installed as `peft_fast.kernels`.

Nothing here is imported by `import peft_fast`: the "triton" backend loads these modules
lazily through `peft_fast.ops.dispatch`.
"""
