"""Layers composed from the ops: the two kinds of T2T layer and the backbone block.

Each takes `params`, a dict under the official module's local names (e.g. 'attn.qkv.weight'),
and its backward returns the gradients under the same names.
"""


def sub_dict(d, prefix):
    """The entries of d whose key starts with prefix, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in d.items() if key.startswith(prefix)}


def add_prefix(d, prefix):
    """The inverse of sub_dict: every key gets the prefix."""
    return {prefix + key: value for key, value in d.items()}
