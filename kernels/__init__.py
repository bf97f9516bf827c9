"""Triton kernels, one op per file; installed as `peft_fast.kernels`.

Nothing here is imported by `import peft_fast` but row_groups.py (the mixed-batch grouping
type, torch only): the "triton" backend loads the kernel modules lazily through
`peft_fast.ops.dispatch`.
"""
