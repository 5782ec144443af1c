"""Plotly 7 encodes arrays as base64 ``bdata`` in figure JSON: decode before asserting."""

from __future__ import annotations

import base64
import json

import numpy as np

_DTYPES = {"i1": np.int8, "u1": np.uint8, "i2": np.int16, "u2": np.uint16, "i4": np.int32,
           "u4": np.uint32, "f4": np.float32, "f8": np.float64, "i8": np.int64, "u8": np.uint64}


def decode(value):
    """A plotly array field as a plain list (handles {"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=_DTYPES[value["dtype"]])
        if "shape" in value:
            shape = value["shape"]
            arr = arr.reshape([int(x) for x in str(shape).split(",")] if isinstance(shape, str) else shape)
        return arr.tolist()
    return value


def traces(spec: str | dict) -> list[dict]:
    """The traces of a figure JSON with x/y/z decoded."""
    fig = json.loads(spec) if isinstance(spec, str) else spec
    out = []
    for tr in fig["data"]:
        tr = dict(tr)
        for k in ("x", "y", "z"):
            if k in tr:
                tr[k] = decode(tr[k])
        out.append(tr)
    return out
