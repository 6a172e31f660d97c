"""Build a model on the meta device and fill its parameters from safetensors weights.

A tensor the model uses exactly as stored (same dtype and layout, CPU) becomes a view of the
file, mapped copy-on-write: loading reads nothing, the pages come from the page cache when first
touched, and they stay shared with every other process that maps the file (and are dropped
under memory pressure rather than swapped). Every other tensor is allocated once, in its final
dtype, device and layout, and the file's bytes are read into it with positioned reads, not
through the mapping: a touched mapped page counts as resident memory, so reading through it
and converting would hold those weights twice. A tensor that needs converting (another dtype,
the input-major layout, another device) goes through a small staging buffer a few rows at a
time. Model transforms (``loader.transforms``) run between the meta build and the fill: they
may swap modules and decide how each tensor fills its parameter (the input-major layout is one,
chosen by the CPU's capabilities). Parameters are plain ``torch.empty`` memory: asking for huge
pages (MADV_HUGEPAGE) made a bf16 -> float32 load 1.6x slower on an AMD EPYC VM with THP in
madvise mode (each 2 MiB fault zeroes and may compact), though it had helped on an Intel VM. Every checkpoint key must be
consumed and every parameter filled, otherwise a ModelLoadError names the key and file. A mapped
file must not be rewritten while a model uses it (as with any mmap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import re
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from ..errors import ModelLoadError
from ..jsonfile import read_json_object, short_repr
from ..models.base import LoadableModel
from .compute import record_compute_dtype
from .transforms import Fill, ModelTransform, default_transforms

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")

# the dtype codes of the safetensors format
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
STAGING_BYTES = 2 * 2**20  # bytes read per converting copy: they stay in L2 between the read and the copy
TRANSPOSE_ROWS = 64  # rows per read into an input-major weight: the transposed writes stay in cache
# Tensors read and converted at once, each on its own thread (reads and copies release the GIL).
# Measured on 2 cores, 1.3B DiT, bf16 / fp32 from a bf16 file: one thread 2.7 / 2.9 s, two 2.2 / 1.8 s;
# with another process spinning on one core, one thread 8.8 / 6.6 s (torch's thread team spins at
# each copy's barrier waiting for its descheduled twin), two 2.8 / 2.3 s.
LOAD_THREADS = 2
# Below this many bytes to read, one thread: for the 1.3B DiT's 6 MB of float32-kept tensors a
# second thread made the reads 0.01 -> 0.03 s (it competes with torch's own threads in each copy).
PARALLEL_READ_BYTES = 64 * 2**20


def find_weight_files(folder: Path, stems: tuple[str, ...] = WEIGHT_NAMES) -> list[Path]:
    """The safetensors files of a component folder (single file or sharded with an index), named
    ``<stem>.safetensors`` or by ``<stem>.safetensors.index.json`` for the first stem found.

    One rule for a single file, an index, its shards and the component folder itself (see
    ``vidloom.loader.components``): the names are confined to the folder, symlinks are followed
    wherever they lead, and what they lead to must be a regular file (a folder, for a component).
    """
    for stem in stems:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _shards(folder, index)
    names = " or ".join(f"{stem}.safetensors" for stem in stems)
    raise ModelLoadError(
        f"no safetensors weights found (expected {names}, or a sharded *.safetensors.index.json)",
        file=str(folder),
    )


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files an index names. The names are confined, not where a file leads: each must
    be a plain file name of this folder (``../x.safetensors`` and ``/etc/passwd`` are refused),
    while the file itself may be a symlink to anywhere, as every file of a Hugging Face cache
    snapshot is a link into ``blobs/`` (see ``find_weight_files``)."""
    weight_map = read_json_object(index, "shard index").get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ModelLoadError("shard index needs a non-empty weight_map of tensor name -> file name",
                             file=str(index))
    files = []
    for name in sorted(set(weight_map.values())):
        if not is_plain_file_name(name, ".safetensors"):
            raise ModelLoadError(f"shard index names {short_repr(name)}: shards must be *.safetensors files "
                                 "of the component's own folder (a plain file name)", file=str(index))
        path = folder / name
        if not path.is_file():
            raise ModelLoadError("shard listed in the index is missing (or not a regular file)", file=str(path))
        files.append(path)
    return files


def is_plain_file_name(name: str, suffix: str) -> bool:
    """Whether ``name`` names a file directly inside a folder: no path separator of any system,
    not "." or "..", no NUL or other control character, and ending in ``suffix``."""
    return (Path(name).name == name and name not in (".", "..") and "/" not in name and "\\" not in name
            and name.endswith(suffix) and len(name) > len(suffix)
            and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name))


def _rename(key: str, table, reverse: bool = False) -> str:
    padded = f".{key}."
    for ckpt_frag, param_frag in table:
        src, dst = (param_frag, ckpt_frag) if reverse else (ckpt_frag, param_frag)
        padded = padded.replace(src, dst)
    return padded[1:-1]


def checkpoint_to_param_name(model_cls: type[LoadableModel], key: str) -> str:
    return _rename(key, model_cls.checkpoint_key_map)


def param_to_checkpoint_name(model_cls: type[LoadableModel], name: str) -> str:
    return _rename(name, model_cls.checkpoint_key_map, reverse=True)


def _target_dtype(model_cls, name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if any(pattern in f".{name}" for pattern in model_cls.keep_fp32):
        return torch.float32
    return dtype


def _set_tensor(modules: dict[str, torch.nn.Module], name: str, value: torch.Tensor) -> torch.Tensor:
    """Parameter ``name`` (of the model whose ``named_modules()`` is ``modules``) := ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    modules[owner_name]._parameters[leaf] = param = torch.nn.Parameter(value, requires_grad=False)
    return param


# ----------------------------------------------------------------------------- safetensors files


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes lie and what they hold."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # file position of the first byte
    nbytes: int


class SafetensorsFile:
    """A safetensors file read with positioned reads: ``entries`` from the header (checked against
    the file's size), ``read_into`` to fill a buffer. Format: an 8-byte little-endian header
    length, a JSON header {key: {dtype, shape, data_offsets: [begin, end]}}, then the data."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ModelLoadError(f"cannot read safetensors file ({exc.strerror})", file=str(path)) from exc
        try:
            self.entries = self._read_header()
            if hasattr(os, "posix_fadvise"):  # a larger read-ahead window for a cold file
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException as exc:
            os.close(self.fd)
            if isinstance(exc, OSError):
                raise self._error(str(exc)) from exc
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def _error(self, reason: str, key: str | None = None) -> ModelLoadError:
        return ModelLoadError(f"cannot read safetensors file ({reason})", file=str(self.path), key=key)

    def _read_header(self) -> list[StoredTensor]:
        size = os.fstat(self.fd).st_size
        if size < 8:
            raise self._error(f"{size} bytes, too short for a header")
        header_len = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise self._error(f"header length {header_len} does not fit a file of {size} bytes")
        try:
            header = json.loads(os.pread(self.fd, header_len, 8))
        except RecursionError as exc:
            raise self._error("header is nested too deeply") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._error(f"header is not valid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        data_start, data_len = 8 + header_len, size - 8 - header_len
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise self._error("__metadata__ is not an object of strings")
        self.metadata: dict[str, str] = metadata  # the writer's notes (e.g. a LoRA's lora_adapter_metadata)
        entries = [self._entry(key, info, data_start, data_len) for key, info in header.items()
                   if key != "__metadata__"]
        entries.sort(key=lambda e: (e.offset, e.nbytes))  # file order: sequential reads
        self._check_coverage(entries, data_start, data_len)
        return entries

    def _check_coverage(self, entries: list[StoredTensor], data_start: int, data_len: int) -> None:
        """The format's rule: the tensors tile the data section exactly, each beginning where the
        previous one ends, from its first byte to its last. Overlapping tensors (two names sharing
        bytes) or bytes that belong to no tensor mean a corrupt or tampered file."""
        end = data_start
        for entry in entries:
            if entry.offset != end:
                kind = "overlaps the tensor before it" if entry.offset < end else "leaves a gap before it"
                raise self._error(f"tensor data {kind} (begins at byte {entry.offset - data_start}, "
                                  f"expected {end - data_start})", entry.key)
            end += entry.nbytes
        if end != data_start + data_len:
            raise self._error(f"{data_start + data_len - end} bytes after the last tensor belong to no tensor")

    def _entry(self, key: str, info, data_start: int, data_len: int) -> StoredTensor:
        if not isinstance(info, dict):
            raise self._error(f"header entry is not an object: {info!r}", key)
        if not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
            raise self._error(f"unknown dtype {short_repr(info.get('dtype'))}", key)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise self._error(f"invalid shape {shape!r}", key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise self._error(f"invalid data_offsets {offsets!r}", key)
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._error(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                              f"shape {shape} {info['dtype']} needs {nbytes}", key)
        if offsets[1] > data_len:
            raise self._error(f"file is truncated: tensor data ends at byte {offsets[1]} of a data "
                              f"section of {data_len} bytes", key)
        return StoredTensor(key, dtype, tuple(shape), data_start + offsets[0], nbytes)

    def mapping(self) -> torch.UntypedStorage:
        """The whole file mapped copy-on-write (MAP_PRIVATE): writing to a view never reaches the file."""
        try:
            return torch.UntypedStorage.from_file(os.fspath(self.path), shared=False, nbytes=os.fstat(self.fd).st_size)
        except RuntimeError as exc:
            raise self._error(f"cannot map the file: {exc}") from exc

    def view(self, mapping: torch.UntypedStorage, entry: StoredTensor) -> torch.Tensor:
        """Tensor ``entry`` as a view of ``mapping``."""
        flat = torch.empty(0, dtype=entry.dtype).set_(mapping, entry.offset // entry.dtype.itemsize,
                                                       (entry.nbytes // entry.dtype.itemsize,))
        return flat.view(entry.shape)

    def read_into(self, buffer: memoryview, offset: int, key: str) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset`` on."""
        done = 0
        try:
            while done < len(buffer):
                n = os.preadv(self.fd, [buffer[done:]], offset + done)
                if n == 0:
                    raise ModelLoadError("cannot read tensor (the file ended early: changed while loading?)",
                                         file=str(self.path), key=key)
                done += n
        except OSError as exc:
            raise ModelLoadError(f"cannot read tensor ({exc})", file=str(self.path), key=key) from exc


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable view of the bytes of contiguous CPU tensor ``t`` (keeps ``t`` alive)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Staging:
    """One reusable CPU buffer for the rows of a tensor on their way to a converted destination."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def rows(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = n * math.prod(row_shape) * dtype.itemsize
        if nbytes > self.buffer.numel():
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes].view(dtype).view(n, *row_shape)


def _read_tensor(file: SafetensorsFile, entry: StoredTensor, dst: torch.Tensor, staging: _Staging,
                 convert=None, shard=None) -> None:
    """Fill ``dst`` (shape ``entry.shape``, any dtype, device and strides) with ``entry``'s values,
    or with ``convert`` of them (read whole, then converted: see ``transforms.Fill``), or with
    the ``shard`` of them (``dst`` its shape)."""
    if entry.nbytes == 0:
        return
    if shard is not None:
        _read_shard(file, entry, dst, staging, shard)
        return
    if convert is not None:
        stored = torch.empty(entry.shape, dtype=entry.dtype)
        file.read_into(_bytes_of(stored), entry.offset, entry.key)
        _copy_rows(dst, convert(stored).to(dst.device))
        return
    if dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous():
        file.read_into(_bytes_of(dst), entry.offset, entry.key)  # straight into the parameter
        return
    dst = dst.reshape(1) if dst.dim() == 0 else dst
    rows, row_shape = dst.shape[0], tuple(dst.shape[1:])
    row_bytes = entry.nbytes // rows
    step = TRANSPOSE_ROWS if _is_input_major(dst) else max(1, STAGING_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        chunk = staging.rows(n, row_shape, entry.dtype)
        file.read_into(_bytes_of(chunk), entry.offset + r0 * row_bytes, entry.key)
        _copy_rows(dst[r0:r0 + n], chunk)


def _read_shard(file: SafetensorsFile, entry: StoredTensor, dst: torch.Tensor, staging: _Staging, shard) -> None:
    """Read only ``shard``'s slice of ``entry`` into ``dst``: along dim 0 one byte range of rows,
    along dim 1 each row's span (rows read in staged chunks, their other columns dropped)."""
    start, stop = shard.span(entry.shape[shard.dim])
    rows = entry.shape[0]
    row_shape = tuple(entry.shape[1:])
    row_bytes = entry.nbytes // rows
    first, last = (start, stop) if shard.dim == 0 else (0, rows)
    dst = dst.reshape(1) if dst.dim() == 0 else dst
    step = max(1, STAGING_BYTES // row_bytes)
    for r0 in range(first, last, step):
        n = min(step, last - r0)
        chunk = staging.rows(n, row_shape, entry.dtype)
        file.read_into(_bytes_of(chunk), entry.offset + r0 * row_bytes, entry.key)
        part = chunk if shard.dim == 0 else chunk[:, start:stop]
        _copy_rows(dst[r0 - first:r0 - first + n], part)


def _is_input_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.shape[1] > 1


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; into input-major rows it is written in the storage's own order, as
    (in, n) columns of the (in, out) storage, which runs faster than the same copy seen as rows."""
    if _is_input_major(dst):
        dst.t().copy_(src.t())
    else:
        dst.copy_(src)


# ----------------------------------------------------------------------------- model loading


def _empty(shape, device, dtype, input_major: bool) -> torch.Tensor:
    if input_major:  # (in, out) storage seen through a transpose: shape (out, in), strides (1, out)
        return _empty(tuple(shape[::-1]), device, dtype, False).t()
    return torch.empty(shape, device=device, dtype=dtype)


def _mappable(fill: Fill, entry: StoredTensor) -> bool:
    """Whether the parameter can be the stored tensor itself: used as stored (see ``Fill``) and
    aligned for its dtype (safetensors writers align; a file that does not is read instead)."""
    return entry.nbytes > 0 and fill.as_stored and entry.offset % entry.dtype.itemsize == 0


def _destination(modules, fill: Fill, shape) -> torch.Tensor:
    """The parameter of ``fill``, allocated in its final dtype, device and layout."""
    value = _empty(shape, fill.device, fill.dtype, fill.input_major)
    return _set_tensor(modules, fill.name, value).data


class _MetaBuild(TorchFunctionMode):
    """Builds modules on the meta device without running ``torch.nn.init``: parameters get
    shapes and no values, which the checkpoint supplies. On meta tensors the initialisers do no
    useful work but still dispatch through Python decompositions (a 1.3B DiT bf16 load measured
    0.10 -> 0.08 s without them). A torch-function mode, so it acts on this thread only (patching
    ``torch.nn.init`` would also skip the init of a model built on another thread meanwhile)."""

    FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
                           torch.randn, torch.arange, torch.linspace, torch.tensor})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while building: the build makes thousands of objects, which
    right after ``import torch`` triggered a full collection of every module's objects (0.09 s,
    measured; the build itself takes 0.025 s). The build makes no cycles worth collecting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclasses.dataclass(frozen=True)
class FileSnapshot:
    """What a mapped weight file looked like when its pages became parameters."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileSnapshot:
        st = os.stat(path)
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        try:
            return FileSnapshot.of(self.path) != self
        except OSError:
            return True


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A model folder checked without building anything: its config, the weight files' headers
    read and checked against the config (layer counts), so a corrupt or mismatched folder fails
    before any module is built or any weight read."""

    model_cls: type[LoadableModel]
    folder: Path
    config: object
    files: tuple[Path, ...]


def prepare_model(model_cls: type[LoadableModel], folder: str | Path) -> PreparedModel:
    folder = Path(folder)
    config = model_cls.config_class.from_json(folder / "config.json")
    files = find_weight_files(folder)
    keys = []
    for path in files:
        with SafetensorsFile(path) as file:
            keys += [entry.key for entry in file.entries]
    check_layer_counts(model_cls.layer_counts, config, keys, folder)
    return PreparedModel(model_cls, folder, config, tuple(files))


def check_layer_counts(layer_counts, config, keys: list[str], folder: Path) -> None:
    """Each (pattern, count) of ``layer_counts``: the indices the checkpoint's keys hold must be
    exactly 0..count(config)-1. Checked on the headers, before the model is built: a config that
    says 10**9 layers over a 2-layer checkpoint is an error at once, not minutes of building."""
    for pattern, count in layer_counts:
        regex = re.compile(pattern)
        found = {int(m.group(1)) for m in map(regex.match, keys) if m is not None}
        expected = count(config)
        if found != set(range(expected)):
            held = f"indices 0..{max(found)}" if found == set(range(len(found))) and found else \
                f"{len(found)} distinct indices"
            raise ModelLoadError(f"config.json implies {expected} of '{_readable(pattern)}' but the checkpoint "
                                 f"holds {held}", file=str(folder / "config.json"))


def _readable(pattern: str) -> str:
    """A layer-count regex as a key template for messages: r"blocks\\.(\\d+)\\." -> "blocks.N."."""
    text = re.sub(r"\(\?:[^)]*\)\?", "", pattern)  # optional prefixes
    return text.replace(r"(\d+)", "N").replace("\\.", ".")


def load_model(model_cls: type[LoadableModel], folder: str | Path, device="cpu", dtype=torch.float32,
               map_weights: bool = True, transforms: tuple[ModelTransform, ...] | None = None):
    """Read ``config.json`` and the safetensors in ``folder`` into a ready ``model_cls``.

    ``map_weights``: parameters used exactly as stored are views of the mapped file (see the
    module's doc; ``changed_mapped_files`` tells whether a file changed since); False reads every
    tensor into memory of the process's own. ``transforms``: applied between the meta build and
    the fill (``loader.transforms``); None: those this CPU's capabilities choose.
    """
    return load_prepared(prepare_model(model_cls, folder), device, dtype, map_weights, transforms)


def load_prepared(prepared: PreparedModel, device="cpu", dtype=torch.float32, map_weights: bool = True,
                  transforms: tuple[ModelTransform, ...] | None = None):
    """Build ``prepared``'s model on meta, apply ``transforms`` and fill it from its files (see
    ``load_model``). The model computes in ``dtype`` (``loader.compute``)."""
    model_cls, folder, device = prepared.model_cls, prepared.folder, torch.device(device)
    transforms = default_transforms() if transforms is None else tuple(transforms)
    try:
        with _MetaBuild(), _gc_paused():
            model = model_cls(prepared.config)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. sizes whose product overflows
        raise ModelLoadError(f"invalid config ({exc})", file=str(folder / "config.json")) from exc
    with _MetaBuild(), _gc_paused():  # modules a transform swaps in are built on meta too
        for transform in transforms:
            model = transform.apply(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # in this process
    modules = dict(model.named_modules())
    expected = {name: stored_shape(modules[name.rpartition(".")[0]], name.rpartition(".")[2], shape)
                for name, shape in shapes.items()}  # in the checkpoint (a shard's whole tensor)
    filled: set[str] = set()  # checkpoint keys consumed
    mapped: list[FileSnapshot] = []
    storages: set[int] = set()  # the mappings' addresses (what ``loader.pages`` may release)
    for path in prepared.files:
        with SafetensorsFile(path) as file:
            jobs, mapping = [], None
            for entry, name in _plan_file(model_cls, file, expected, filled):
                fill = Fill(entry.key, name, modules[name.rpartition(".")[0]], entry.dtype,
                            _target_dtype(model_cls, name, entry.dtype, dtype), device)
                for transform in transforms:
                    fill = transform.fill(fill)
                if map_weights and _mappable(fill, entry):
                    if mapping is None:
                        mapping = file.mapping()
                        mapped.append(FileSnapshot.of(path))
                        storages.add(mapping.data_ptr())
                    _set_tensor(modules, name, file.view(mapping, entry))
                else:
                    jobs.append((entry, _destination(modules, fill, shapes[name]), fill.convert, fill.shard))
            _read_all(file, jobs)
    _check_filled(model, model_cls, shapes, filled, folder)
    model.mapped_files = tuple(mapped)
    model.mapped_storages = storages
    record_compute_dtype(model, dtype)
    return model.eval()


def stored_shape(module: torch.nn.Module, param: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint's shape of ``module``'s parameter ``param`` (``shape`` in this process): a
    module holding a shard of it (``parallel.tensor``) names the slice in ``module.shards``."""
    shard = getattr(module, "shards", {}).get(param)
    if shard is None:
        return shape
    full = list(shape)
    full[shard.dim] *= shard.count
    return tuple(full)


def _check_filled(model, model_cls, expected, filled: set[str], folder: Path) -> None:
    missing = [key for key in map(functools.partial(param_to_checkpoint_name, model_cls), expected)
               if key not in filled]
    if missing:
        raise ModelLoadError(
            f"{len(missing)} tensor(s) not found in the checkpoint, first", file=str(folder), key=missing[0]
        )
    if any(b.is_meta for b in model.buffers()):
        raise ModelLoadError("model has buffers the checkpoint cannot fill", file=str(folder))


def changed_mapped_files(model: torch.nn.Module) -> list[Path]:
    """The files whose pages ``model``'s parameters map and that changed on disk since loading
    (replaced, truncated, rewritten in place). Reading a parameter of a truncated mapped file kills
    the process (SIGBUS), and a file rewritten in place changes the weights under the model; this
    check (a stat per file) lets a caller refuse to run such a model."""
    return [snap.path for snap in getattr(model, "mapped_files", ()) if snap.changed()]


def _read_all(file: SafetensorsFile, jobs: list[tuple[StoredTensor, torch.Tensor, object]]) -> None:
    """Fill every destination of ``jobs`` from ``file``, LOAD_THREADS tensors at a time (reads
    and copies release the GIL) when there is enough to read. The first error stops all threads
    and is raised here."""
    lock, pending, errors = threading.Lock(), iter(jobs), []

    def work() -> None:
        staging = _Staging()
        with torch.no_grad():
            while not errors:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                try:
                    _read_tensor(file, *job[:2], staging, *job[2:])
                except BaseException as exc:  # handed to the calling thread
                    errors.append(exc)

    n_threads = LOAD_THREADS if sum(job[0].nbytes for job in jobs) >= PARALLEL_READ_BYTES else 1
    threads = [threading.Thread(target=work, name=f"vidloom-load-{i}") for i in range(n_threads - 1)]
    for t in threads:
        t.start()
    try:
        work()
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def _plan_file(model_cls, file: SafetensorsFile, expected, filled: set[str]):
    """(entry, parameter) for every tensor of ``file``; checks every key and shape before a byte
    of data is read, so a wrong checkpoint fails at once."""
    plan = []
    for entry in file.entries:
        name = checkpoint_to_param_name(model_cls, entry.key)
        if name not in expected or entry.key in filled:
            raise ModelLoadError("unexpected checkpoint key", file=str(file.path), key=entry.key)
        if not entry.dtype.is_floating_point:
            raise ModelLoadError(f"stored as {entry.dtype} but the model's parameters are floating point",
                                 file=str(file.path), key=entry.key)
        if entry.shape != expected[name]:
            raise ModelLoadError(
                f"shape mismatch: checkpoint {entry.shape} vs model {expected[name]}", file=str(file.path),
                key=entry.key,
            )
        filled.add(entry.key)
        plan.append((entry, name))
    return plan


def save_model(model: LoadableModel, folder: str | Path, version: str = "0.42.1") -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` in Diffusers layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": model.diffusers_class, "_diffusers_version": version, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {param_to_checkpoint_name(type(model), name): p.detach().cpu().contiguous()
               for name, p in model.named_parameters()}
    save_file(tensors, os.fspath(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
