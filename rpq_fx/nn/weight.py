"""``RPQWeight``: a dense weight stored dormant as codebooks plus uint8 codes."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ..ops import check_codes, embedding, expand, hot_embedding

__all__ = ["RPQWeight", "LookupWeight", "lookup_weight", "code_dtype", "rpq_bytes", "additive_bytes", "hot_bytes",
           "rpq_weights", "check_index"]


def code_dtype(num_codes: int) -> torch.dtype:
    """uint8 codes up to 256 codewords, int16 (read as unsigned) up to 65536."""
    return torch.uint8 if num_codes <= 256 else torch.int16


def rpq_bytes(num_codebooks: int, codebook_dim: int, num_vectors: int, num_codes: int,
              shared_codebooks: bool, element_size: int) -> int:
    """Bytes of codebooks plus codes for one RPQ weight."""
    groups = 1 if shared_codebooks else num_codebooks
    code_size = torch.empty(0, dtype=code_dtype(num_codes)).element_size()
    return groups * num_codes * codebook_dim * element_size + num_codebooks * num_vectors * code_size


def additive_bytes(num_codebooks: int, codebook_dim: int, num_vectors: int, num_codes: int,
                   shared_codebooks: bool, element_size: int, additive_codebooks: int = 1) -> int:
    """Bytes of an RPQ weight of ``additive_codebooks`` stages: each stage its own codebooks and codes."""
    return additive_codebooks * rpq_bytes(num_codebooks, codebook_dim, num_vectors, num_codes, shared_codebooks,
                                          element_size)


def hot_bytes(row_len: int, hot_rows: int, hot_codebook_dim: int, num_codes: int, element_size: int) -> int:
    """Bytes of a weight's hot part: its shared residual codebook, its codes and its int32 row index."""
    if not hot_rows:
        return 0
    codes_and_codebook = rpq_bytes(row_len // hot_codebook_dim, hot_codebook_dim, hot_rows, num_codes, True, element_size)
    return codes_and_codebook + 4 * hot_rows


def check_index(value: torch.Tensor, stored: torch.dtype, bound: int, where: str) -> None:
    """Raise unless every value of ``value`` is a whole number in ``[0, bound)`` that a cast to ``stored``
    keeps exactly: the check for codes (``stored`` uint8 / int16, read unsigned) and hot-row indices
    that come from outside (a state dict, a checkpoint). ``where`` names the tensor in the message."""
    if value.is_meta or value.numel() == 0:
        return
    if value.dtype == stored and stored in (torch.uint8, torch.int16):
        check_codes(value, bound, where)
        return
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{where}: expected integers in [0, {bound}) ({stored}), got a {value.dtype} tensor")
    if value.is_floating_point() and not torch.equal(value, value.trunc()):
        bad = value[value != value.trunc()].reshape(-1)[0].item()
        raise TypeError(f"{where}: {value.dtype} value {bad} is not a whole number; expected integers in "
                        f"[0, {bound}) ({stored})")
    low, high = value.min().item(), value.max().item()
    if low < 0 or high >= bound:
        raise IndexError(f"{where}: value {low if low < 0 else high} is out of range: must be in [0, {bound}) "
                         f"(stored as {stored}, a cast would change it)")


def rpq_weights(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, "RPQWeight"]]:
    """``(name, weight)`` for every RPQ weight in ``model`` (each once, unless ``remove_duplicate=False``),
    without the parts inside them (hot rows, additive stages)."""
    parts = {id(p) for m in model.modules() if isinstance(m, RPQWeight) for p in m.parts()}
    return [(name, m) for name, m in model.named_modules(remove_duplicate=remove_duplicate)
            if isinstance(m, RPQWeight) and id(m) not in parts]


class RPQWeight(nn.Module):
    """A ``[num_vectors, num_codebooks * codebook_dim]`` weight, expanded on every call.

    ``codebooks`` is a Parameter ``[C, K, d]`` (``[1, K, d]`` when shared), ``codes`` a buffer
    ``[C, N]`` and ``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]``. ``shape`` views the
    expanded rows as a layer's weight (e.g. a convolution's ``[out, in, kh, kw]``); ``transposed``
    returns ``W.T``, for a parameter stored ``[in, out]`` (GPT-2's ``Conv1D``). ``compute_dtype``
    is the expanded weight's dtype where it differs from the codebooks' (float16 codebooks of a
    float32 layer are cast, small as they are, before each expansion).

    ``hot_rows`` rows get a second, finer code on top of their own: ``hot`` is an RPQ weight of
    those rows (one shared codebook of ``num_codes`` codewords of ``hot_codebook_dim`` values) and
    ``hot_index`` (int32) says which rows they are: ``W[hot_index[h]] += hot()[h]``. For an embedding
    these are the tokens looked up most, where the error reaches the output most often.
    """

    def __init__(self, num_codebooks: int, codebook_dim: int, num_vectors: int, num_codes: int = 256,
                 shared_codebooks: bool = False, *, shape: Sequence[int] | None = None,
                 transposed: bool = False, compute_dtype: torch.dtype | None = None, hot_rows: int = 0,
                 hot_codebook_dim: int | None = None, additive_codebooks: int = 1, device=None, dtype=None):
        super().__init__()
        for name, value, low in (("num_codebooks", num_codebooks, 1), ("codebook_dim", codebook_dim, 1),
                                 ("num_vectors", num_vectors, 1), ("num_codes", num_codes, 2),
                                 ("additive_codebooks", additive_codebooks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"RPQWeight: {name} must be an int >= {low}, got {value!r}")
        if num_codes > 65536:
            raise ValueError(f"RPQWeight: num_codes must be <= 65536, got {num_codes}")
        self.num_codebooks, self.codebook_dim = num_codebooks, codebook_dim
        self.num_vectors, self.num_codes = num_vectors, num_codes
        self.shared_codebooks = shared_codebooks
        self.shape = tuple(shape) if shape is not None else (num_vectors, num_codebooks * codebook_dim)
        if (not self.shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.shape)
                or math.prod(self.shape) != num_vectors * num_codebooks * codebook_dim
                or self.shape[0] != num_vectors):
            raise ValueError(f"RPQWeight: shape {self.shape} does not hold {num_vectors} rows of "
                             f"{num_codebooks}x{codebook_dim} values")
        if transposed and len(self.shape) != 2:
            raise ValueError(f"RPQWeight: transposed=True needs a 2-D shape, got {self.shape}")
        self.transposed = transposed
        self.compute_dtype = compute_dtype
        groups = 1 if shared_codebooks else num_codebooks
        self.codebooks = nn.Parameter(torch.empty(groups, num_codes, codebook_dim, device=device, dtype=dtype))
        self.register_buffer("codes", torch.empty(num_codebooks, num_vectors, device=device,
                                                  dtype=code_dtype(num_codes)))
        self.additive = None
        if additive_codebooks > 1:
            self.additive = nn.ModuleList(
                RPQWeight(num_codebooks, codebook_dim, num_vectors, num_codes, shared_codebooks,
                          compute_dtype=compute_dtype, device=device, dtype=dtype)
                for _ in range(additive_codebooks - 1))
        self.hot = None
        if hot_rows:
            row_len = num_codebooks * codebook_dim
            if isinstance(hot_rows, bool) or not isinstance(hot_rows, int) or not 0 < hot_rows <= num_vectors:
                raise ValueError(f"RPQWeight: hot_rows must be an int in [0, {num_vectors}], got {hot_rows!r}")
            if (isinstance(hot_codebook_dim, bool) or not isinstance(hot_codebook_dim, int) or hot_codebook_dim < 1
                    or row_len % hot_codebook_dim):
                raise ValueError(f"RPQWeight: hot_codebook_dim must be an int dividing the row length {row_len}, "
                                 f"got {hot_codebook_dim!r}")
            self.hot = RPQWeight(row_len // hot_codebook_dim, hot_codebook_dim, hot_rows, num_codes, True,
                                 compute_dtype=compute_dtype, device=device, dtype=dtype)
            self.register_buffer("hot_index", torch.empty(hot_rows, device=device, dtype=torch.int32))
        self.reset_parameters()

    @property
    def additive_codebooks(self) -> int:
        """M: how many codes each slice sums (1 + the additive stages)."""
        return 1 + (len(self.additive) if self.additive is not None else 0)

    def stages(self) -> list["RPQWeight"]:
        """The M stages whose expansions sum to the rows: this weight's own codebooks and codes first."""
        return [self, *(self.additive or ())]

    def parts(self) -> list["RPQWeight"]:
        """The RPQ weights inside this one: the additive stages, then the hot rows' weight."""
        return [*(self.additive or ()), *(() if self.hot is None else (self.hot,))]

    @property
    def dtype(self) -> torch.dtype:
        """The expanded weight's dtype, for code that asks a layer's weight (``x.to(layer.weight.dtype)``)."""
        return self.compute_dtype or self.codebooks.dtype

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def size(self, dim: int | None = None) -> torch.Size | int:
        """The expanded weight's size, as ``Tensor.size`` gives it (code that sizes a layer by its weight)."""
        size = torch.Size(self.shape)
        return size if dim is None else size[dim]

    @property
    def requires_grad(self) -> bool:
        """Whether the codebooks train (the codes never do), for code that asks a layer's weight."""
        return self.codebooks.requires_grad

    @property
    def data(self) -> torch.Tensor:
        """Refused with what to do instead: code that reads or writes ``weight.data`` (transformers'
        ``resize_token_embeddings``, weight copying) expects a dense tensor, and this weight has none."""
        # reason: an AttributeError here would be replaced by nn.Module.__getattr__'s bare "no attribute 'data'"
        raise TypeError(f"this RPQWeight {list(self.shape)} is stored as codebooks and codes, not as a dense tensor, "
                        "so it has no .data to read or overwrite (resize_token_embeddings copies it): resize or "
                        "replace layers in the dense model, then convert it; for the dense values call the weight "
                        "(weight()) or use rpq_fx.decompress(model)")

    @property
    def indices(self) -> torch.Tensor:
        """Alias of ``codes``, the name the reference RPQ used."""
        return self.codes

    def index_bounds(self) -> dict[str, int]:
        """``{buffer name: bound}`` of the buffers that index memory: codes < K, hot-row indices < N."""
        return {"codes": self.num_codes, **({"hot_index": self.num_vectors} if self.hot is not None else {})}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """torch's, after refusing codes or hot-row indices out of range or changed by the cast to the
        stored dtype (int64 codes of 1000 would wrap to uint8 232); the error names the key."""
        for name, bound in self.index_bounds().items():
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor):
                check_index(value, self._buffers[name].dtype, bound, prefix + name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setattr__(self, name: str, value) -> None:
        """Assigned codes / hot-row indices must have the stored dtype and shape and be in range."""
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers and buffers[name] is not None and name in self.index_bounds():
            old = buffers[name]
            if not isinstance(value, torch.Tensor) or value.dtype != old.dtype or value.shape != old.shape:
                got = f"{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"RPQWeight.{name}: expected a {list(old.shape)} {old.dtype} tensor, got {got}")
            check_index(value, old.dtype, self.index_bounds()[name], f"RPQWeight.{name}")
        super().__setattr__(name, value)

    def reset_parameters(self, init: str = "uniform", generator: torch.Generator | None = None,
                         zero_rows: Sequence[int] = ()) -> None:
        """Random codes, and codebooks drawn like the dense layer's default init.

        ``"uniform"``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = row length (torch's Linear and
        Conv default); ``"normal"``: N(0, 1) (torch's Embedding default). Every expanded value is a
        codebook value, so the expanded weight has the same distribution as the dense init.

        ``zero_rows`` (an embedding's ``padding_idx``) read the last codeword of every codebook, set
        to zero and read by no other row: the rows start at zero and, as long as only lookups that
        skip them read them, get no gradient and stay zero. The hot part starts at zero, on the
        first rows that are not ``zero_rows``.
        """
        if self.codebooks.is_meta:
            return
        with torch.no_grad():
            codes = torch.randint(0, self.num_codes - bool(zero_rows), self.codes.shape, generator=generator,
                                  device=self.codes.device, dtype=torch.int32)
            codes[:, list(zero_rows)] = self.num_codes - 1
            self.codes.copy_(codes.to(self.codes.dtype))  # int16 keeps codes >= 32768 as bit patterns
            if init == "uniform":
                bound = 1 / math.sqrt(self.num_codebooks * self.codebook_dim)
                self.codebooks.uniform_(-bound, bound, generator=generator)
            elif init == "normal":
                self.codebooks.normal_(generator=generator)
            else:
                raise ValueError(f"RPQWeight.reset_parameters: init must be 'uniform' or 'normal', got {init!r}")
            if zero_rows:
                self.codebooks[:, -1] = 0
            for stage in self.additive or ():
                stage.reset_parameters(generator=generator, zero_rows=zero_rows)
                stage.codebooks.zero_()
            if self.hot is not None:
                rows = torch.ones(self.num_vectors, dtype=torch.bool)
                rows[list(zero_rows)] = False
                if rows.sum() < self.hot.num_vectors:
                    raise ValueError(f"RPQWeight: hot_rows={self.hot.num_vectors} exceed the {int(rows.sum())} rows "
                                     f"that are not zero_rows")
                self.hot_index.copy_(rows.nonzero()[:self.hot.num_vectors, 0])
                self.hot.reset_parameters(generator=generator)
                self.hot.codebooks.zero_()

    def compute_codebooks(self) -> torch.Tensor:
        """The codebooks in the expanded weight's dtype, cast only where ``compute_dtype`` (a plain
        attribute, so a traced layer sees the ops the rewrite pass writes) asks for another."""
        return self.codebooks if self.compute_dtype is None else self.codebooks.to(self.compute_dtype)

    def expand_rows(self) -> torch.Tensor:
        """The expanded rows ``[num_vectors, C*d]``: the stages' expansions summed in order, hot rows'
        residuals added."""
        rows = expand(self.compute_codebooks(), self.codes)
        for stage in self.additive or ():
            rows = rows.add(stage.expand_rows())
        return rows if self.hot is None else rows.index_add(0, self.hot_index.long(), self.hot.expand_rows())

    def lookup(self, indices: torch.Tensor, padding_idx: int | None = None,
               scale_grad_by_freq: bool = False) -> torch.Tensor:
        """``F.embedding(indices, self(), padding_idx, scale_grad_by_freq=...)``, expanding only the looked-up
        rows (``rpq_fx::embedding`` per stage, the hot rows' residuals added), as the fuse pass writes a lookup;
        the whole weight where that form does not apply (a reshaped or transposed weight, hot rows with
        ``scale_grad_by_freq``)."""
        if self.transposed or len(self.shape) != 2 or (self.hot is not None and scale_grad_by_freq):
            return F.embedding(indices, self(), padding_idx, None, 2.0, scale_grad_by_freq)
        rows = embedding(indices, self.compute_codebooks(), self.codes, padding_idx, scale_grad_by_freq)
        for stage in self.additive or ():
            rows = rows + embedding(indices, stage.compute_codebooks(), stage.codes, padding_idx, scale_grad_by_freq)
        if self.hot is not None:
            rows = rows + hot_embedding(indices, self.hot.compute_codebooks(), self.hot.codes, self.hot_index.long(),
                                        self.num_vectors)
        return rows

    def forward(self) -> torch.Tensor:
        """The dense weight, by the ops the rewrite pass writes for it (``rewrite.expansion``), so a
        traced RPQ layer reads as the graph a converted layer has (saved forwards compare equal)."""
        rows = self.expand_rows()
        if self.transposed:
            return rows.t()
        return rows.view(self.shape) if len(self.shape) != 2 else rows

    def extra_repr(self) -> str:
        shared = ", shared_codebooks=True" if self.shared_codebooks else ""
        shared += ", transposed=True" if self.transposed else ""
        shared += f", compute_dtype={self.compute_dtype}" if self.compute_dtype not in (None, self.codebooks.dtype) else ""
        if self.additive is not None:
            shared += f", additive_codebooks={self.additive_codebooks}"
        if self.hot is not None:
            shared += f", hot_rows={self.hot.num_vectors}, hot_codebook_dim={self.hot.codebook_dim}"
        return (f"num_codebooks={self.num_codebooks}, codebook_dim={self.codebook_dim}, "
                f"num_vectors={self.num_vectors}, num_codes={self.num_codes}{shared}, shape={self.shape}")


_T = torch.Tensor
# reads of a tensor's metadata, answered by a LookupWeight without expanding it: from its values-less (meta) stand-in
_METADATA = frozenset({
    *(getattr(_T, name).__get__ for name in ("shape", "dtype", "ndim", "layout", "is_sparse", "is_quantized",
                                             "is_nested")),
    _T.size, _T.dim, _T.ndimension, _T.numel, _T.nelement, _T.element_size, _T.is_floating_point, _T.is_complex,
    _T.__len__})
# ... and from the RPQ weight: where it lives and whether it trains
_PLACE = {_T.device.__get__: lambda w: w.device, _T.is_cpu.__get__: lambda w: w.device.type == "cpu",
          _T.is_cuda.__get__: lambda w: w.device.type == "cuda", _T.is_meta.__get__: lambda w: w.device.type == "meta",
          _T.get_device: lambda w: w.codebooks.get_device(),
          _T.requires_grad.__get__: lambda w: w.requires_grad and torch.is_grad_enabled()}


class LookupWeight(torch.Tensor):
    """An RPQ weight as a tensor of the dense weight's shape that holds no values, for a layer's own forward
    (run by ``torch.func.functional_call``, an ``nn.Embedding`` subclass's ``forward`` that ends in
    ``super().forward(...)``): an embedding lookup on it (``F.embedding``, ``torch.embedding``) is
    :meth:`RPQWeight.lookup`, which reads only the looked-up rows, and its metadata (shape, dtype, device,
    ``requires_grad``) is the weight's; any other use expands the weight and runs on the dense tensor. Gradients
    reach the codebooks either way (autograd records the ops on them, never on this tensor).

    It is a ``__torch_function__`` subclass of a meta tensor of the weight's shape (``as_subclass``), not a wrapper
    subclass: ``torch.compile`` traces its making and its ``__torch_function__`` into the graph (it cannot trace
    ``_make_wrapper_subclass``, and refuses ``as_subclass`` to a class with ``__torch_dispatch__``). So nothing
    refuses an op that gets past ``__torch_function__`` (only code that switches it off for subclasses does): it
    sees the meta stand-in, and most such ops fail or give a meta tensor, but a few return made-up values
    (``torch.mm`` of a CPU tensor and a meta one gives a CPU tensor).
    """

    weight: RPQWeight

    @staticmethod
    def __new__(cls, weight: RPQWeight):
        # reason: a meta stand-in has the weight's shape and dtype and no storage (the dense values never exist)
        self = torch.empty(weight.shape, dtype=weight.dtype, device="meta").as_subclass(cls)
        self.weight = weight
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PLACE and isinstance(args[0], LookupWeight):
            return _PLACE[func](args[0].weight)
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is F.embedding:
            lookup = _embedding_call(*args, **kwargs)
            if lookup is not None:
                return lookup
        elif func is torch.embedding:
            lookup = _aten_embedding_call(*args, **kwargs)
            if lookup is not None:
                return lookup
        dense = {}  # each weight expanded once per call, however many arguments name it
        args, kwargs = tree_map(lambda v: dense.setdefault(id(v), v.weight()) if isinstance(v, LookupWeight) else v,
                                (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LookupWeight({self.weight.extra_repr()})"


def _embedding_call(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                    sparse=False) -> torch.Tensor | None:
    """``F.embedding``'s lookup on a :class:`LookupWeight` as :meth:`RPQWeight.lookup`, or None where that is not
    the same call: the weight is another argument, ``max_norm`` renormalises rows in place, sparse gradients."""
    if (not isinstance(weight, LookupWeight) or isinstance(input, LookupWeight) or max_norm is not None or sparse
            or not isinstance(input, torch.Tensor)):
        return None
    return weight.weight.lookup(input, padding_idx, scale_grad_by_freq)


def _aten_embedding_call(weight, indices, padding_idx=-1, scale_grad_by_freq=False,
                         sparse=False) -> torch.Tensor | None:
    """``torch.embedding`` (aten's argument order) as :func:`_embedding_call`; aten takes ``padding_idx`` as given,
    so a negative one (-1 by default) matches no index: no padding row."""
    return _embedding_call(indices, weight, None if padding_idx < 0 else padding_idx, None, 2.0,
                           scale_grad_by_freq, sparse)


def lookup_weight(weight: RPQWeight) -> LookupWeight:
    """``weight`` as a :class:`LookupWeight`: what a graph hands a layer's own forward (``functional_call``)."""
    return LookupWeight(weight)
