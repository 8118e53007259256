"""The one way to load a model: alias | local folder | ``.gguf`` file | hub id -> LoadedModel.

Local sources and aliases never touch the network. Weights are read from safetensors or GGUF
only; a folder holding only pickle checkpoints is refused. Models come back in the ``dtype``
asked for (float32 by default; bfloat16 or float16 for the forward passes, every statistic
still accumulating in float64), eval mode, with eager attention (SDPA returns no attention
probabilities). ``trust_remote_code`` is
off unless the caller asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tgeom.errors import TgeomError
from tgeom.models.adapters import adapter_for
from tgeom.models.adapters.common import base_model
from tgeom.models.gguf import convert_gguf
from tgeom.models.offline import OFFLINE_MODELS, offline_model_path
from tgeom.models.placement import (
    DEVICE_MAPS,
    available_bytes,
    check_fits,
    does_not_fit,
    onloaded,
    weight_bytes,
)
from tgeom.models.weights import ArchitectureSummary, CanonicalWeights
from tgeom.runtime import check_dtype_runs, default_device, dtype_name, resolve_dtype

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """A Hugging Face model with its tokenizer, adapter and canonical view.

    ``source`` is the identity string recorded in results (alias, absolute path or hub id).
    """

    hf: nn.Module
    tokenizer: Any
    source: str
    adapter: ModuleType
    summary: ArchitectureSummary
    device_map: str | None = None  # "auto" when accelerate placed the modules
    _weights: CanonicalWeights | None = field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.summary.family

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (its execution device when
        ``device_map="auto"`` offloaded it); with one device, the model's."""
        hf: Any = self.hf
        embedding = hf.get_input_embeddings()
        hook = getattr(embedding, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
        return embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model was loaded in (its forward passes run in it)."""
        return next(self.hf.parameters()).dtype

    @property
    def identity(self) -> dict[str, Any]:
        """What ``results.json`` records of the model: ``{"model": source, "dtype": name}``,
        and for a model placed by ``device_map="auto"`` also ``"device_map": "auto"`` and
        ``"devices"``, the sorted places accelerate put its modules (``"cpu"``, ``"disk"``,
        GPU indices as strings)."""
        identity: dict[str, Any] = {"model": self.source, "dtype": dtype_name(self.dtype)}
        if self.device_map is not None:
            placed = getattr(self.hf, "hf_device_map", None) or {"": self.device}
            identity["device_map"] = self.device_map
            identity["devices"] = sorted({str(place) for place in placed.values()})
        return identity

    @property
    def body(self) -> nn.Module:
        """The transformer without its output head (``hf.base_model``: embeddings, blocks,
        final norm): what hidden states and attentions need, without the ``[B, T, vocab]``
        logits a language-model head would add."""
        return base_model(self.hf)

    def weights(self) -> CanonicalWeights:
        """Canonical weights (SPEC section 0): the model-wide tensors extracted once, each block
        read when indexed (``layers``, a :class:`~tgeom.models.weights.LayerSequence`: views of
        the parameters, no second copy of the model), checked for NaN/inf block by block on the
        first call."""
        if self._weights is None:
            with onloaded(self.hf, skip=self.blocks()):
                cw = self.adapter.extract(self.hf, self.summary)
            cw.check_finite()
            self._weights = cw
        return self._weights

    def blocks(self) -> nn.ModuleList:
        """The residual blocks, in order; their outputs are ``hidden[1..L]``."""
        return self.adapter.blocks(self.hf)

    def special_token_ids(self) -> list[int]:
        """Every id the tokenizer flags special (:func:`tokenizer_special_ids`) that has an
        embedding row."""
        return [i for i in tokenizer_special_ids(self.tokenizer) if i < self.summary.vocab_size]

    @cached_property
    def vocab_strings(self) -> list[str]:
        """One display string per embedding row (decoded token; ``<id:N>`` beyond the tokenizer)."""
        n = self.summary.vocab_size
        known = min(n, len(self.tokenizer))
        decoded = self.tokenizer.batch_decode([[i] for i in range(known)])
        return list(decoded) + [f"<id:{i}>" for i in range(known, n)]

    def encode_text(self, text: str, *, min_tokens: int = 1) -> torch.Tensor:
        """Token ids ``[1, T]`` of ``text`` with the tokenizer's special tokens (BOS/CLS...).

        The one place a user's text becomes tokens for an analysis: refuses (TgeomError) a text
        that is empty or only whitespace, one that gives no token besides special tokens, fewer
        than ``min_tokens`` tokens, or more than the model's context."""
        if not text.strip():
            raise TgeomError("the text is empty or only whitespace; pass --text with some words.")
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if set(ids[0].tolist()) <= set(self.special_token_ids()):
            raise TgeomError("the text gives only special tokens; pass --text with some words.")
        n_tokens = int(ids.shape[1])
        if n_tokens < min_tokens:
            raise TgeomError(
                f"the text gives {n_tokens} token(s): fewer than {min_tokens} tokens; "
                "pass a longer --text."
            )
        if n_tokens > self.summary.n_ctx:
            raise TgeomError(
                f"the text gives {n_tokens} tokens, more than the model context "
                f"({self.summary.n_ctx}); pass a shorter --text."
            )
        return ids

    def token_strings(self, ids: Any) -> list[str]:
        """Display strings for token ids (any iterable of ints or an int tensor)."""
        vocab = self.vocab_strings
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [vocab[int(i)] for i in ids]


def tokenizer_special_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of every token ``tokenizer`` flags special: its named special tokens
    (``all_special_ids``: BOS, EOS, PAD, ...) and every added token marked ``special`` in its
    added-tokens table (SmolLM2's ``<filename>``, ``<jupyter_code>``, ... are only there)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return sorted(ids)


def load_model(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> LoadedModel:
    """Load ``source`` (alias, local folder, ``.gguf`` file or hub id) for analysis.

    ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16`` (a name or a torch dtype): the
    precision of the weights and the forward passes. One the device cannot compute in is
    refused in one line before any weight is read. ``device_map="auto"`` (accelerate) spreads a
    model larger than one device over the GPUs, then the CPU (``max_memory``, accelerate's
    format, caps each device); hidden states and canonical weights then live where their blocks
    do. A model whose weights exceed the memory of its device(s) is refused in one line before
    any weight is read."""
    _quiet_transformers()
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise TgeomError(f"device_map must be 'auto' or None, got {device_map!r}.")
    if device_map is not None and device is not None:
        raise TgeomError("pass either device or device_map='auto', not both.")
    torch_dtype = resolve_dtype(dtype)
    target = torch.device(device) if device is not None else default_device()
    check_dtype_runs(torch_dtype, target)
    folder, local, identity = resolve_source(source, dtype=torch_dtype)
    config = _load_config(folder, local, trust_remote_code)
    adapter = adapter_for(config.model_type)
    model_class = _model_class(config)
    needed = weight_bytes(folder, torch_dtype) if local else 0
    available = available_bytes(device_map, target, max_memory)
    check_fits(needed, available, torch_dtype, auto=device_map is not None)
    placement: dict[str, Any] = (
        {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
    )
    try:
        hf = model_class.from_pretrained(
            folder,
            config=config,
            dtype=torch_dtype,
            attn_implementation="eager",
            use_safetensors=True,
            local_files_only=local,
            trust_remote_code=trust_remote_code,
            **placement,
        )
    except OSError as exc:
        raise TgeomError(f"cannot load the weights of {source}: {_first_line(exc)}") from None
    except ValueError as exc:
        if "offload" not in str(exc):  # accelerate would offload to disk: tgeom does not
            raise
        raise does_not_fit(needed, available, torch_dtype, auto=True) from None
    hf.eval().requires_grad_(False)
    if device_map is None:
        hf.to(target)
    tokenizer = _load_tokenizer(folder, local, trust_remote_code)
    with onloaded(hf, skip=adapter.blocks(hf)):
        summary = adapter.summarize(hf)
    lm = LoadedModel(hf, tokenizer, identity, adapter, summary, device_map)
    lm.weights()  # the model-wide tensors now, and every block checked for NaN/inf, in one line
    return lm


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``source`` alone (cheap: no weights are loaded). The architecture is
    still checked, so that an unsupported model fails here as it would in any analysis."""
    _quiet_transformers()
    folder, local, _ = resolve_source(source)
    adapter_for(_load_config(folder, local, trust_remote_code).model_type)
    return _load_tokenizer(folder, local, trust_remote_code)


def resolve_source(source: str, *, dtype: torch.dtype = torch.float32) -> tuple[str, bool, str]:
    """``(folder or hub id, is_local, identity)``; converts a ``.gguf`` once to a cached folder
    (its weights in ``dtype``)."""
    if source in OFFLINE_MODELS:
        path = offline_model_path(source)
        identity = source
    else:
        path = Path(source).expanduser()
        identity = str(path.resolve()) if path.exists() else source
        if not path.exists():
            if _looks_like_path(source):
                raise TgeomError(
                    f"model path {source} does not exist; pass an existing folder or .gguf "
                    f"file, a hub id, or an alias ({', '.join(OFFLINE_MODELS)})."
                )
            return source, False, source
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TgeomError(
                f"{path} is not a model tgeom can read: pass a Hugging Face folder with "
                "config.json and safetensors weights, or a .gguf file."
            )
        return str(convert_gguf(path, dtype=dtype)), True, identity
    _check_folder(path)
    return str(path), True, identity


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a bad path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or source.lower().endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))
    )


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise TgeomError(
            f"folder {path} has no config.json; pass a Hugging Face model folder "
            "(config.json + safetensors weights) or a .gguf file."
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"only pickle checkpoints ({', '.join(pickles)})" if pickles else "no weights"
        raise TgeomError(
            f"folder {path} holds {what}; tgeom loads safetensors or GGUF only (pickles can run "
            "code): convert the checkpoint with save_pretrained(safe_serialization=True)."
        )


def _load_config(folder: str, local: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            folder, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        message = _first_line(exc)
        if "trust_remote_code" in message:
            raise TgeomError(
                f"{folder} needs custom code to load; rerun with --trust-remote-code if you "
                "trust its author."
            ) from None
        raise TgeomError(f"cannot read the config of {folder}: {message}") from None
    except OSError as exc:
        raise TgeomError(
            f"cannot find model '{folder}' ({_first_line(exc)}); pass a local folder, a .gguf "
            f"file, or an alias ({', '.join(OFFLINE_MODELS)})."
        ) from None


def _model_class(config: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_tokenizer(folder: str, local: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            folder, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise TgeomError(f"cannot load the tokenizer of {folder}: {_first_line(exc)}") from None


def _quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (tgeom shows its own progress)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
