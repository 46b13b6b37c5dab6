"""The hand-written operations: each file holds one op's forward and, right below it, its backward.

Conventions (after CS231n's layers.py): `op_forward(...) -> (out, cache)` and
`op_backward(dout, cache) -> gradients`, in the order of the forward's inputs.
Shape letters: B batch, N tokens, C channels, D width, H/W height/width, h heads.
"""
