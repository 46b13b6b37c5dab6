"""Does a dict of arrays have the names and shapes it should? One comparison for the model's
state dict, the optimizer's state and foreign weights files, each of which words its own
error message from the answer."""

import numpy as np


def compare_keys(arrays, shapes, optional=()):
    """arrays {name: array-like}, shapes {name: shape} -> (missing, unexpected, wrong_shape):

    missing       names of shapes absent from arrays (except those in `optional`)
    unexpected    names of arrays that shapes does not have
    wrong_shape   (name, shape given, shape expected) where both have the name
    """
    missing = [k for k in shapes if k not in arrays and k not in optional]
    unexpected = [k for k in arrays if k not in shapes]
    wrong_shape = [(k, tuple(np.shape(arrays[k])), tuple(shapes[k])) for k in shapes
                   if k in arrays and tuple(np.shape(arrays[k])) != tuple(shapes[k])]
    return missing, unexpected, wrong_shape
