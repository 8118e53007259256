"""``tgeom report``: run the three analysis families on one model and corpus, write one page.

The page (``DIR/index.html``) is self-contained; every number in it is also in
``DIR/results.json`` and every figure also a PNG in ``DIR/figures``. Each section's output is
cached under ``DIR/.cache`` keyed by the model, corpus and options, so a re-run with the same
inputs only re-assembles the page.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from tgeom.errors import TgeomError
from tgeom.report import html as H
from tgeom.results import atomic_write_text, prepare_out_dir, to_jsonable, write_results

REPORT_MARKER = ".tgeom-report"


AUTO = "auto"
"""An option the report sizes from the model by :meth:`ReportOptions.sized_for`."""

CPU_BUDGET = (
    "tgeom report MODEL with its CPU defaults finishes within 15 minutes on 2 CPU cores for each "
    "offline real model (minilm, smollm2, gemma3)"
)
"""The report's CPU budget; the CPU defaults and the sizing rule below are chosen to meet it."""

CPU_ATLAS_WORK = 4096**2 * 30 * 9 * 64
"""The head atlas' work on the CPU, ``N^2 * n_blocks * n_heads * d_head`` for ``N`` atlas tokens
(every head's exact top-k over an ``N x N`` rank-``d_head`` product): SmolLM2's 30 blocks x 9
heads x d_head 64 with ``N = 4,096``."""
MIN_ATLAS_VOCAB = 1024
"""The sized atlas never reads fewer of the most frequent corpus tokens than this."""
MIN_NULL_SEQUENCES = 16
"""Points of Pearson(raw, effective) against length: the sized null-space batch keeps this many."""


def _round_down(n: float, step: int) -> int:
    return int(n // step * step)


@dataclass(frozen=True)
class ReportOptions:
    """What the report computes; sized for a 2-core CPU by default (see :meth:`for_device`).

    Options set to :data:`AUTO` are sized from the model's architecture by :meth:`sized_for`
    (the rule is in its docstring and in the README); the report states the sizes it used."""

    seq_len: int = 64
    windows_per_topic: int = 16
    atlas_k: int = 5
    # rows/cols of the atlas: the N most frequent corpus tokens (None: whole vocabulary)
    atlas_vocab: int | str | None = AUTO
    atlas_blocks: tuple[int, ...] | None = None  # None: every block
    neurons_per_block: int = 3
    lens_text: str = "The capital of France is Paris. The quick brown fox jumps over the dog."
    identify_sequences: int = 64  # a 70/15/15 split's test part of 10: no degenerate-split warning
    identify_hidden: int | None = 8  # hidden states evaluated for identifiability (None: all)
    null_seq_len: int | str = AUTO  # longest sequence of the null-space / effective batch
    null_sequences: int | str = AUTO  # sequences of that batch (lengths spread from 8 up)
    attribution_tokens: int = 16
    attribution_mode: str = "estimate"  # exact costs T * d JVPs: the GPU default
    attribution_samples: int = 8
    heads_windows: int | None = 32  # the head atlas' attention pass: evenly spaced windows
    seed: int = 0
    dtype: str = "float32"  # the model's precision (--dtype); statistics stay float64
    device_map: str | None = None  # "auto": spread over the GPUs, then the CPU (--device-map)

    @classmethod
    def for_device(cls, device_type: str, **overrides: Any) -> ReportOptions:
        if device_type == "cuda":
            base = cls(
                seq_len=128,
                windows_per_topic=64,
                atlas_k=10,
                atlas_vocab=None,
                identify_sequences=200,
                identify_hidden=None,
                null_sequences=200,
                attribution_tokens=32,
                attribution_mode="exact",
                heads_windows=None,
            )
        else:
            base = cls()
        return cls(**{**asdict(base), **overrides})

    def sized_for(self, summary: Any) -> ReportOptions:
        """These options with every :data:`AUTO` size replaced by the rule, from ``summary``
        (an :class:`~tgeom.models.weights.ArchitectureSummary`):

        - ``atlas_vocab = min(4096, V, max(1024, N))`` with ``N`` the largest multiple of 128
          whose atlas work ``N^2 * n_blocks * n_heads * d_head`` stays within
          :data:`CPU_ATLAS_WORK` (SmolLM2's at 4,096 tokens);
        - ``null_seq_len = min(n_ctx, max(seq_len, 2 * d_head))``: effective attention differs
          from raw attention only in sequences longer than ``d_head`` (SPEC 5), so the batch
          reaches twice that;
        - ``null_sequences = max(16, identify_sequences * (seq_len / null_seq_len)^2)``: the
          null-space work grows with the square of the length, so longer sequences come fewer,
          never fewer than 16 (:data:`MIN_NULL_SEQUENCES`).
        """
        sizes: dict[str, Any] = {}
        if self.atlas_vocab == AUTO:
            heads = summary.n_blocks * summary.n_heads * summary.d_head
            fit = _round_down((CPU_ATLAS_WORK / heads) ** 0.5, 128)
            sizes["atlas_vocab"] = min(4096, summary.vocab_size, max(MIN_ATLAS_VOCAB, fit))
        null_len = self.null_seq_len
        if null_len == AUTO:
            null_len = min(summary.n_ctx, max(self.seq_len, 2 * summary.d_head))
            sizes["null_seq_len"] = null_len
        if self.null_sequences == AUTO:
            scaled = int(self.identify_sequences * (self.seq_len / int(null_len)) ** 2)
            sizes["null_sequences"] = max(MIN_NULL_SEQUENCES, scaled)
        return replace(self, **sizes)


@dataclass
class Section:
    """One part of the page: its HTML (built from escaped parts) and its numbers."""

    anchor: str
    title: str
    html: str
    results: dict[str, Any] = field(default_factory=dict)
    uses_plotly: bool = False
    warnings: list[str] = field(default_factory=list)
    """One line per result of the section that cannot mean what its name says (the analyses'
    own ``warnings``); shown at the top of the section and recorded in ``results.json``."""


class ReportContext:
    """What sections share: the model and windows, loaded lazily (a cached re-run loads nothing)."""

    def __init__(
        self, model: str, corpus: str, options: ReportOptions, out: Path, progress: Any
    ) -> None:
        self.model_source, self.corpus_source = model, corpus
        self.options, self.out, self.progress = options, out, progress
        self._shared: dict[str, Any] = {}
        (out / "figures").mkdir(exist_ok=True)

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run under ``name``: what one section computes and a later
        one reuses (the corpus statistics, the weights' top pairs)."""
        if name not in self._shared:
            self._shared[name] = compute()
        return self._shared[name]

    @cached_property
    def lm(self) -> Any:
        from tgeom.models import load_model

        with self.progress.stage(f"loading {self.model_source}"):
            return load_model(
                self.model_source, dtype=self.options.dtype, device_map=self.options.device_map
            )

    @cached_property
    def sized(self) -> ReportOptions:
        """The options with every :data:`AUTO` size fixed for this model (loads it)."""
        return self.options.sized_for(self.lm.summary)

    @cached_property
    def corpus(self) -> Any:
        from tgeom.corpus import load_corpus

        with self.progress.stage(f"reading corpus {self.corpus_source}"):
            return load_corpus(self.corpus_source)

    @cached_property
    def windows(self) -> Any:
        from tgeom.corpus import make_windows

        return make_windows(
            self.corpus,
            self.lm.tokenizer,
            self.options.seq_len,
            max_windows_per_topic=self.options.windows_per_topic,
            max_context=self.lm.summary.n_ctx,
        )

    def spread_windows(self, seq_len: int, n: int) -> Any:
        """Token ids ``[<= n, seq_len]`` of windows of ``seq_len`` tokens, taken from the topics in
        turn (the first window of every topic, then the second, ...)."""
        import torch

        from tgeom.corpus import make_windows

        per_topic = -(-n // len(self.corpus.topics))
        windows = make_windows(
            self.corpus,
            self.lm.tokenizer,
            seq_len,
            max_windows_per_topic=per_topic,
            max_context=self.lm.summary.n_ctx,
        )
        topics = windows.topic_ids.tolist()
        rank: list[int] = []  # each window's place within its topic
        seen: dict[int, int] = {}
        for topic in topics:
            rank.append(seen.get(topic, 0))
            seen[topic] = rank[-1] + 1
        order = sorted(range(len(topics)), key=lambda i: (rank[i], topics[i]))[:n]
        return windows.token_ids[torch.tensor(order, dtype=torch.long)]

    def save_figure(self, fig: Any, name: str, caption: str) -> str:
        """Save a matplotlib figure as ``figures/<name>.png``; return its HTML block."""
        import matplotlib.pyplot as plt

        path = self.out / "figures" / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        block = H.figure(H.png_data_url(fig), caption, fig_id=f"fig-{name}")
        plt.close(fig)
        return block


SectionBuilder = Callable[[ReportContext], Section]


def cache_key(model: str, corpus: str, options: ReportOptions, section: str) -> str:
    from tgeom import __version__

    identity = {
        "model": _source_identity(model),
        "corpus": _source_identity(corpus),
        "section": section,
        "options": asdict(options),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _source_identity(source: str) -> str:
    """A path's absolute name, size and mtime (so an edited model invalidates the cache)."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def check_out_dir(out: Path, force: bool) -> Path:
    """Refuse an existing non-empty folder that is not a previous report, unless ``force``."""
    if out.exists() and not out.is_dir():
        raise TgeomError(f"--out {out} is a file; pass a folder for the report.")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_MARKER).exists() and not force:
        raise TgeomError(
            f"--out {out} already holds files that are not a tgeom report; pass an empty or new "
            "folder, or --force to write into it anyway."
        )
    out = prepare_out_dir(out)
    (out / REPORT_MARKER).write_text("tgeom report folder\n", encoding="utf-8")
    return out


def build_report(
    model: str,
    corpus: str,
    out: str | Path,
    *,
    options: ReportOptions | None = None,
    sections: list[tuple[str, SectionBuilder]] | None = None,
    force: bool = False,
    progress: Any = None,
) -> Path:
    """Run every section (or reuse its cache) and write ``index.html`` + ``results.json``."""
    from tgeom.runtime import default_device

    options = options or ReportOptions.for_device(default_device().type)
    created = not Path(out).exists()
    out_dir = check_out_dir(Path(out), force)
    try:
        built = _build_sections(model, corpus, out_dir, options, sections, progress)
    except BaseException:
        if created:  # a failed first run leaves nothing behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    title = f"tgeom report: {model}"
    page = H.page(
        title,
        [(s.anchor, s.title, H.warnings_block(s.warnings) + s.html) for s in built],
        with_plotly=any(s.uses_plotly for s in built),
    )
    atomic_write_text(out_dir / "index.html", page)
    write_results(
        out_dir,
        "report",
        {
            "model": model,
            "dtype": options.dtype,
            "corpus": corpus,
            "options": _options_used(built, options),
            "environment": environment(),
            "sections": {s.anchor: s.results for s in built},
        },
        warnings=[f"{s.anchor}: {line}" for s in built for line in s.warnings],
    )
    return out_dir / "index.html"


def _options_used(built: list[Section], options: ReportOptions) -> dict[str, Any]:
    """The options with the sizes the model card recorded (the given ones if it did not run)."""
    for section in built:
        if "options_used" in section.results:
            return dict(section.results["options_used"])
    return asdict(options)


def environment() -> dict[str, str]:
    import torch
    import transformers

    from tgeom import __version__

    return {
        "tgeom": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": str(torch.get_num_threads()),
        "cpu_count": str(os.cpu_count()),
    }


def _build_sections(
    model: str,
    corpus: str,
    out_dir: Path,
    options: ReportOptions,
    sections: list[tuple[str, SectionBuilder]] | None,
    progress: Any,
) -> list[Section]:
    from tgeom.report.progress import Progress
    from tgeom.report.sections import default_sections

    progress = progress or Progress(quiet=True)
    ctx = ReportContext(model, corpus, options, out_dir, progress)
    cache_dir = out_dir / ".cache"
    cache_dir.mkdir(exist_ok=True)
    built: list[Section] = []
    for name, builder in sections if sections is not None else default_sections():
        cache_file = cache_dir / f"{name}-{cache_key(model, corpus, options, name)}.json"
        if cache_file.is_file():
            built.append(Section(**json.loads(cache_file.read_text(encoding="utf-8"))))
            continue
        section = builder(ctx)
        atomic_write_text(cache_file, json.dumps(to_jsonable(asdict(section))))
        built.append(section)
    return built
