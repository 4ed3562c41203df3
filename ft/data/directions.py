"""Directions files: a safetensors file with one tensor `directions` [n, width], one direction per
row (probe weights, steering vectors, differences of means), optional names in its metadata.

Metadata key `names`: a JSON list of n distinct strings (letters, digits, `_` and `-`), so a
direction can be written `layer.4.resid@sentiment` as well as `layer.4.resid@0`. A run that uses
directions keeps a copy as `directions.safetensors` in its run directory (the contract), so its
objectives can be rebuilt without the original file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ft.core.errors import TargetError

TENSOR = "directions"
RUN_FILE = "directions.safetensors"
NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class DirectionSet:
    vectors: torch.Tensor  # [n, width] float32, as stored
    names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.vectors)

    def row(self, name: str) -> int:
        """The row of `name`: a row number, or a name from the file's metadata."""
        if name.isdigit():
            r = int(name)
            if r >= len(self):
                raise TargetError(f"direction {name!r}: {self.source} has {len(self)} rows; valid: 0..{len(self) - 1}")
            return r
        if self.names and name in self.names:
            return self.names.index(name)
        valid = f"names {self.names[:8]}{'...' if len(self.names) > 8 else ''}" if self.names else "no names"
        raise TargetError(f"direction {name!r} is not in {self.source}; valid: a row 0..{len(self) - 1}, or one of its "
                          f"{valid}")

    def name(self, row: int) -> str | None:
        return self.names[row] if self.names else None

    def vector(self, name: str, width: int, point: str) -> torch.Tensor:
        if self.vectors.shape[1] != width:
            raise TargetError(f"{self.source}: directions are {self.vectors.shape[1]} wide, {point} is {width} wide "
                              f"in this model; valid: a [n, {width}] tensor for {point}")
        return self.vectors[self.row(name)]

    def save(self, path: Path) -> None:
        from ft.core.integrity import save_tensors

        meta = {"names": json.dumps(self.names)} if self.names else None
        save_tensors({TENSOR: self.vectors.contiguous()}, path, metadata=meta)


def load_directions(path: str | Path) -> DirectionSet:
    """Read and check a directions file; TargetError (one line, naming the file) if it is not one."""
    from safetensors import safe_open

    path = Path(str(path)).expanduser()
    where = f"target.file={str(path)!r}"
    if not path.is_file():
        raise TargetError(f"{where} does not exist; valid: a safetensors file with a {TENSOR!r} tensor [n, width]")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            if TENSOR not in keys:
                raise TargetError(f"{where} has no {TENSOR!r} tensor (it has {keys[:6]}); valid: a tensor named "
                                  f"{TENSOR!r} [n, width]")
            v = f.get_tensor(TENSOR)
    except TargetError:
        raise
    except Exception as e:  # safetensors' header and size errors: a cut-short or foreign file
        raise TargetError(f"{where} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    if v.ndim != 2 or v.shape[0] == 0 or not v.is_floating_point():
        raise TargetError(f"{where}: {TENSOR!r} is {tuple(v.shape)} {v.dtype}; valid: a float tensor [n >= 1, width]")
    v = v.float()
    if not torch.isfinite(v).all():
        bad = int((~torch.isfinite(v)).any(1).nonzero()[0])
        raise TargetError(f"{where}: row {bad} of {TENSOR!r} is not finite; valid: finite values")
    zero = (v.abs().sum(1) == 0).nonzero()
    if len(zero):
        raise TargetError(f"{where}: row {int(zero[0])} of {TENSOR!r} is all zeros; nothing to maximize")
    names = None
    if "names" in meta:
        try:
            names = json.loads(meta["names"])
        except json.JSONDecodeError:
            names = None
        if (not isinstance(names, list) or len(names) != len(v) or len(set(map(str, names))) != len(names)
                or not all(isinstance(n, str) and NAME.match(n) and not n.isdigit() for n in names)):
            raise TargetError(f"{where}: metadata 'names' must be a JSON list of {len(v)} distinct names of letters, "
                              "digits, _ and - (not all digits)")
    return DirectionSet(v, names, str(path))
