"""Weights known by shape and dtype, read from their files one tensor at a time.

`read_lazy_state_dict` is a drop-in for `loaders.read_state_dict` that reads no values: a
safetensors header, or a `.pt`/`.bin` unpickled memory-mapped (`torch.load(weights_only=True,
mmap=True)`). Every tensor it returns is a `LazyTensor`: a meta tensor with a recipe. torch
functions applied to it (the loaders' renames, HF CLIP's q/k/v concatenation, the resized
vocabulary's filled rows) are recorded, not run, so `loaders.resolve_flamingo` works unchanged
on lazy tensors, and `SourceFiles.materialize` replays one recipe at a time on the real data.

Memory: a safetensors tensor is a view of its file mapped per read (unmapped when dropped); a
`.pt`/`.bin` tensor is copied out of the mapping in chunks and each chunk's pages are given back
(madvise), so reading a file never keeps more than the tensor asked for resident. A legacy
(pre-zip) `.pt` cannot be mapped: it is loaded whole, one such file at a time.
"""

from __future__ import annotations

import ctypes
import mmap
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .loaders import LoadError, all_finite

# safetensors header dtype names -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_META = torch.empty(0, device="meta")
# Chunk of a mapped tensor copied before its pages are given back.
_COPY_CHUNK_BYTES = 64 << 20


class LazyValueError(LoadError):
    """Code asked a lazy tensor for its values (only shapes and dtypes are known lazily)."""


Recipe = tuple  # ("file", path, key path, format) | ("op", func, args, kwargs) | ("item", op, i)


class LazyTensor(torch.Tensor):
    """A meta tensor plus the recipe that computes its values from the source files."""

    _recipe: Recipe

    @staticmethod
    def __new__(cls, meta: torch.Tensor, recipe: Recipe) -> LazyTensor:
        out = torch.Tensor._make_subclass(cls, meta)
        out._recipe = recipe
        return out

    @classmethod
    def __torch_function__(
        cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):
            raise LazyValueError(f"in-place {name} on a lazily read tensor is not supported")
        try:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" in str(e):
                raise LazyValueError(
                    f"{name or func} needs the values of a tensor that is read lazily "
                    "(streaming export); only shapes and dtypes are known before it is written"
                ) from e
            raise
        if isinstance(out, torch.Tensor):
            return LazyTensor(out, ("op", func, args, kwargs))
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            op = ("op", func, args, kwargs)
            return type(out)(LazyTensor(o, ("item", op, i)) for i, o in enumerate(out))
        return out


def lazy_leaf(like: torch.Tensor, path: Path, key: tuple[str, ...], fmt: str) -> LazyTensor:
    meta = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device="meta")
    return LazyTensor(meta, ("file", path, key, fmt))


def _torch_load(path: Path) -> tuple[Any, str]:
    """torch.load(weights_only=True), memory-mapped when the file allows it."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True), "torch"
    except RuntimeError as e:
        if "zipfile" not in str(e) and "mmap" not in str(e):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True), "torch-legacy"


def _lazy_tree(obj: Any, path: Path, fmt: str, key: tuple[str, ...] = ()) -> Any:
    if isinstance(obj, torch.Tensor):
        return lazy_leaf(obj, path, key, fmt)
    if isinstance(obj, dict):
        return {k: _lazy_tree(v, path, fmt, (*key, k)) for k, v in obj.items()}
    return obj


def read_lazy_state_dict(path: Path) -> dict[str, Any]:
    """`loaders.read_state_dict` without the values: every tensor is a LazyTensor leaf."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out: dict[str, Any] = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    piece = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise LoadError(
                            f"{path}: tensor {key!r} has dtype {piece.get_dtype()}, which the "
                            "streaming export does not read"
                        )
                    meta = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
                    out[key] = lazy_leaf(meta, path, (key,), "safetensors")
            return out
        obj, fmt = _torch_load(path)
    except LoadError:
        raise
    except Exception as e:  # corrupt or truncated files surface many exception types
        raise LoadError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return _lazy_tree(obj, path, fmt)


# ---------------------------------------------------------------------------------------------
# Reading values
# ---------------------------------------------------------------------------------------------


def _madvise_dontneed() -> Callable[[int, int], None] | None:
    advice = getattr(mmap, "MADV_DONTNEED", None)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    if advice is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE

    def release(address: int, length: int) -> None:
        start = -(-address // page) * page
        end = (address + length) // page * page
        if end > start:
            fn(start, end - start, advice)

    return release


_release_pages = _madvise_dontneed()


def _copy_out_of_mapping(view: torch.Tensor) -> torch.Tensor:
    """An owned copy of a tensor that lives in a read-only file mapping, giving each copied
    chunk's pages back to the kernel (they stay in the page cache, not in this process)."""
    if not view.is_contiguous() or _release_pages is None:
        out = view.clone(memory_format=torch.contiguous_format)
        if _release_pages is not None:
            _release_pages(view.data_ptr(), view.numel() * view.element_size())
        return out
    out = torch.empty_like(view, memory_format=torch.contiguous_format)
    src, dst = view.reshape(-1), out.view(-1)
    step = max(1, _COPY_CHUNK_BYTES // max(1, view.element_size()))
    for start in range(0, src.numel(), step):
        piece = src[start : start + step]
        dst[start : start + step].copy_(piece)
        _release_pages(piece.data_ptr(), piece.numel() * piece.element_size())
    return out


class SourceFiles:
    """Values of lazy tensors, one source tensor at a time.

    `.pt`/`.bin` files stay mapped while they are in use (at most `keep_open` of them, no pages
    resident after a read); a legacy `.pt` is held in memory, one at a time.
    """

    def __init__(self, keep_open: int = 2) -> None:
        self.keep_open = keep_open
        self._torch: OrderedDict[Path, tuple[Any, str]] = OrderedDict()
        self.bytes_read = 0

    def _torch_file(self, path: Path) -> tuple[Any, str]:
        if path in self._torch:
            self._torch.move_to_end(path)
            return self._torch[path]
        loaded = _torch_load(path)
        limit = 1 if loaded[1] == "torch-legacy" else self.keep_open
        while len(self._torch) >= limit:
            self._torch.popitem(last=False)
        self._torch[path] = loaded
        return loaded

    def read(self, path: Path, key: tuple[str, ...], fmt: str) -> torch.Tensor:
        """The tensor stored under `key` (a key path into nested dicts) in `path`."""
        try:
            if fmt == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    value = f.get_tensor(key[0])
            else:
                obj, loaded_fmt = self._torch_file(path)
                for k in key:
                    obj = obj[k]
                value = obj if loaded_fmt == "torch-legacy" else _copy_out_of_mapping(obj)
        except Exception as e:
            raise LoadError(
                f"{path}: cannot read tensor {'/'.join(key)!r} ({type(e).__name__}: {e})"
            ) from e
        if value.is_floating_point() and not all_finite(value):
            # loaders.check_weight's value check, which a lazy tensor defers to its read
            name = "/".join(key)
            raise LoadError(f"{path}: tensor {name!r} holds non-finite values (NaN or Inf)")
        self.bytes_read += value.numel() * value.element_size()
        return value

    def materialize(self, tensor: torch.Tensor) -> torch.Tensor:
        """The real values of a (lazy) tensor; a plain tensor is returned as is. Each step's
        result is dropped as soon as the last step using it has run."""
        uses: Counter[int] = Counter()
        self._count(tensor, uses, set())
        return self._run(tensor, {}, uses)

    def _count(self, node: Any, uses: Counter[int], seen: set[int]) -> None:
        if isinstance(node, LazyTensor):
            recipe = node._recipe
            uses[id(recipe)] += 1
            if id(recipe) not in seen:
                seen.add(id(recipe))
                if recipe[0] == "op":
                    self._count(recipe[2], uses, seen)
                    self._count(recipe[3], uses, seen)
                elif recipe[0] == "item":
                    self._count(LazyTensor.__new__(LazyTensor, _META, recipe[1]), uses, seen)
        elif isinstance(node, (list, tuple)):
            for n in node:
                self._count(n, uses, seen)
        elif isinstance(node, dict):
            for n in node.values():
                self._count(n, uses, seen)

    # plain recursion, no closures: a reference cycle through the memo would keep every value
    # alive until the garbage collector runs
    def _run(self, node: Any, memo: dict[int, Any], uses: Counter[int]) -> Any:
        if isinstance(node, LazyTensor):
            return self._run_recipe(node._recipe, memo, uses)
        if isinstance(node, (list, tuple)):
            return type(node)(self._run(n, memo, uses) for n in node)
        if isinstance(node, dict):
            return {k: self._run(v, memo, uses) for k, v in node.items()}
        return node

    def _run_recipe(self, recipe: Recipe, memo: dict[int, Any], uses: Counter[int]) -> Any:
        key = id(recipe)
        if key not in memo:
            kind = recipe[0]
            if kind == "file":
                memo[key] = self.read(recipe[1], recipe[2], recipe[3])
            elif kind == "op":
                _, func, args, kwargs = recipe
                memo[key] = func(*self._run(args, memo, uses), **self._run(kwargs, memo, uses))
            else:  # ("item", op, i): one output of an op returning several tensors
                memo[key] = self._run_recipe(recipe[1], memo, uses)[recipe[2]]
        uses[key] -= 1
        return memo[key] if uses[key] > 0 else memo.pop(key)

    def close(self) -> None:
        self._torch.clear()


def source_files_of(tensor: torch.Tensor) -> list[str]:
    """The files a lazy tensor's values come from (for messages and progress)."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, LazyTensor):
            visit_recipe(node._recipe)
        elif isinstance(node, (list, tuple)):
            for n in node:
                visit(n)
        elif isinstance(node, dict):
            for n in node.values():
                visit(n)

    def visit_recipe(recipe: Recipe) -> None:
        if recipe[0] == "file":
            if str(recipe[1]) not in found:
                found.append(str(recipe[1]))
        elif recipe[0] == "op":
            visit(recipe[2])
            visit(recipe[3])
        else:
            visit_recipe(recipe[1])

    visit(tensor)
    return found
