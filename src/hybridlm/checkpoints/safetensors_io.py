"""Safetensors checkpoints read tensor by tensor and written tensor by tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes, offsets relative to the end of the header.

Reading parses each file's header once and then reads one tensor at a time with ``readinto``,
straight into the destination tensor when it can. No memory map: the pages of a mapped file count
toward the process's resident set while the map is open, so reading a whole checkpoint through one
``safe_open`` handle peaks at about twice the weights; plain reads keep it near one copy.

Writing streams: the header is computed from shapes alone, then each tensor is produced, written
and dropped, so exporting needs no second copy of the model either. A checkpoint directory is
written into a staging sibling, fsynced, and moved into place (``destination.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hybridlm.checkpoints.destination import (
    check_destination,
    describe_os_error,
    fsync_dir,
    make_staging_dir,
    move_into_place,
    resolve_target,
)
from hybridlm.progress import progress

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``file`` from absolute byte ``offset``, ``nbytes`` long."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, metadata).

    Raises ValueError naming the file for a truncated file or a corrupt header, so nothing is read
    from a file whose tensors would not all be there.
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header length)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(
                f"{path}: corrupt or truncated safetensors file: the header claims {header_len:,} bytes but the file "
                f"holds {size:,} bytes in all"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupt safetensors header (not valid JSON: {error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    stored = entry.get("dtype") if isinstance(entry, dict) else None
    if isinstance(stored, str) and stored not in DTYPES:
        raise ValueError(
            f"{path}: tensor {name} has dtype {stored}, which hybridlm cannot read (known: {', '.join(DTYPES)})"
        )
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: corrupt safetensors header: bad entry for tensor {name}: {entry!r}") from error
    nbytes = math.prod(shape) * _element_size(dtype)
    if begin < 0 or end - begin != nbytes:
        raise ValueError(
            f"{path}: corrupt safetensors header: tensor {name} {entry['dtype']}{list(shape)} needs {nbytes:,} "
            f"bytes but its data_offsets are [{begin}, {end}]"
        )
    if data_start + end > file_size:
        raise ValueError(
            f"{path}: truncated safetensors file: tensor {name} ends at byte {data_start + end:,} but the file has "
            f"{file_size:,} bytes"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)


def _is_hub_cache_blob(link: Path, resolved: Path) -> bool:
    """The Hugging Face hub cache keeps every file of ``snapshots/<revision>/`` as a link into the
    repository's ``blobs/``; that link leaves the directory by design and is allowed."""
    snapshot = link.parent.absolute()
    return snapshot.parent.name == "snapshots" and resolved.parent == (snapshot.parent.parent / "blobs").resolve()


def _byte_view(tensor: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


class CheckpointReader:
    """The tensors of a checkpoint directory: ``model.safetensors`` or a sharded index.

    Only headers are read on construction; ``read(name)`` reads one tensor.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        single_path = self.directory / SINGLE_FILE
        self.tensors: dict[str, TensorInfo] = {}
        if index_path.exists():
            self.source = index_path
            self._read_index(index_path)
        elif single_path.exists():
            self.source = single_path
            self.tensors, self.metadata = read_header(single_path)
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt")
            )
            hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
            raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._handles: dict[Path, object] = {}

    def _read_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map' object): {error}") from error
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        self.metadata = {}
        for file_name, names in by_file.items():
            shard = self._shard_path(index_path, file_name, names[0])
            if not shard.exists():
                raise FileNotFoundError(
                    f"{index_path}: shard {file_name} is missing; it should hold {len(names)} tensors, e.g. {names[0]}"
                )
            header, _ = read_header(shard)
            absent = [n for n in names if n not in header]
            if absent:
                raise ValueError(
                    f"{shard}: tensor {absent[0]} is listed for this shard in {INDEX_FILE} but the shard lacks it "
                    f"({len(absent)} such tensors)"
                )
            for name in names:
                self.tensors[name] = header[name]

    def _shard_path(self, index_path: Path, file_name: object, example: str) -> Path:
        """The shard ``file_name`` of the index, refused unless it lies in this directory: an index may
        not send the reader to ``../x.safetensors``, an absolute path, or through a link out of it."""
        refusal = f"{index_path}: shard {file_name!r} (for tensor {example}) "
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(refusal + "is not a file name")
        shard = self.directory / file_name
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise ValueError(refusal + "points outside the checkpoint directory")
        resolved, home = shard.resolve(), self.directory.resolve()
        if not resolved.is_relative_to(home) and not _is_hub_cache_blob(shard, resolved):
            raise ValueError(refusal + f"is a link to {resolved}, outside the checkpoint directory")
        return shard

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        """The tensor ``name`` as stored; read straight into ``out`` when it is a contiguous CPU tensor of
        the stored dtype and shape (then ``out`` is returned)."""
        info = self.tensors[name]
        is_direct = (
            out is not None
            and out.device.type == "cpu"
            and out.dtype == info.dtype
            and tuple(out.shape) == info.shape
            and out.is_contiguous()
        )
        target = out if is_direct else torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self._read_into(info, _byte_view(target), info.offset, f"tensor {info.name}")
        return target

    def read_rows(self, name: str, rows: range) -> Tensor:
        """Rows ``rows`` (dim 0) of the tensor ``name`` as stored: one contiguous byte range of its file."""
        info = self.tensors[name]
        if not (rows.step == 1 and 0 <= rows.start <= rows.stop <= (info.shape[0] if info.shape else 0)):
            raise ValueError(f"{info.name}: rows {rows.start}..{rows.stop} are not within its {info.shape[:1]} rows")
        out = torch.empty((len(rows), *info.shape[1:]), dtype=info.dtype)
        row_bytes = math.prod(info.shape[1:]) * out.element_size()
        if out.numel():
            where = f"rows {rows.start}..{rows.stop} of {info.name}"
            self._read_into(info, _byte_view(out), info.offset + rows.start * row_bytes, where)
        return out

    def _read_into(self, info: TensorInfo, buffer: memoryview, offset: int, what: str) -> None:
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        handle.seek(offset)
        filled = 0
        while filled < len(buffer):
            count = handle.readinto(buffer[filled:])
            if not count:
                raise ValueError(
                    f"{info.file}: truncated while reading {what}: got {filled:,} of {len(buffer):,} bytes "
                    "(was the file changed after its header was read?)"
                )
            filled += count

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape, known before its data is produced."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    tensors: Iterator[tuple[str, Tensor]],
    metadata: Mapping[str, str],
    advance: Callable[[int], None] = lambda steps=1: None,
) -> None:
    """Write ``specs`` in order, pulling each tensor's data from ``tensors`` (same order) as it goes;
    ``advance()`` after each tensor (a progress bar)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for spec in specs:
            name, tensor = next(tensors)
            if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise RuntimeError(
                    f"writer got {name} {tensor.dtype} {tuple(tensor.shape)}, expected {spec.name} {spec.dtype} "
                    f"{spec.shape}"
                )
            tensor = tensor.detach().to("cpu").contiguous()
            if spec.nbytes:
                f.write(_byte_view(tensor))
            advance(1)
        f.flush()
        os.fsync(f.fileno())


def _shard_groups(specs: list[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    if max_shard_bytes is None:
        return [specs]
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def write_checkpoint_dir(
    target: str | os.PathLike,
    specs: list[TensorSpec],
    tensors: Iterator[tuple[str, Tensor]],
    files: Mapping[str, str | bytes | Path],
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory: weights (one file, or shards + index) plus ``files`` (name -> text,
    bytes, or a path to copy), into a staging directory moved into place when complete (see
    ``destination.py``: what may be replaced, and how).

    Raises ValueError (before writing) when ``target`` is not free to write, OSError naming ``target``
    when writing fails (read-only or full file system); either way nothing is left behind."""
    check_destination(target, overwrite)
    shown, target = target, resolve_target(target)
    created_parents = [parent for parent in target.absolute().parents if not parent.exists()]
    staging = None
    is_written = False
    try:
        staging = make_staging_dir(target)
        _write_weights(staging, specs, tensors, max_shard_bytes)
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, staging / name)
            else:
                _write_file(staging / name, content)
        fsync_dir(staging)
        move_into_place(staging, target, overwrite)
        is_written = True
    except OSError as error:
        raise OSError(describe_os_error(Path(shown), error)) from error
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not is_written:
            for parent in created_parents:  # nearest first; a directory someone else filled meanwhile stays
                try:
                    parent.rmdir()
                except OSError:
                    break
    return target


def _write_weights(
    directory: Path, specs: list[TensorSpec], tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int | None
) -> None:
    groups = _shard_groups(specs, max_shard_bytes)
    metadata = {"format": "pt"}
    with progress("writing weights", total=len(specs)) as advance:
        if len(groups) == 1:
            write_safetensors(directory / SINGLE_FILE, groups[0], tensors, metadata, advance)
            return
        weight_map = {}
        for number, group in enumerate(groups, start=1):
            file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(directory / file_name, group, tensors, metadata, advance)
            weight_map.update({spec.name: file_name for spec in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    _write_file(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _write_file(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
