"""The numerical core: pure functions on torch tensors (no IO, no Ray, no click).

Device-generic: the same code runs on `cpu` and `cuda` tensors.
"""
