"""``python -m fusedloss demo``: a small GPT-style language model trained twice on the same batches.

Run 1 computes the loss the usual way, LM head then ``F.cross_entropy`` on the (N, V) logits; run 2 calls
``fusedloss.linear_cross_entropy(hidden, head.weight, target)``, which is the same math without the
logits. Same initial weights, same seed, same batches: the two loss curves must coincide up to fp32
rounding. The text is the Python standard library's own source code (present on every machine, no
download), split into words and punctuation by a regex; the ``--vocab-size`` most frequent tokens
(``<unk>`` included) make the vocabulary, built once and cached.

Outputs: a table (speed, peak memory, final loss), ``losses.csv`` (per-step losses of both runs) and
``loss_curves.png`` in ``--out``, and a verdict on the agreement of the two curves.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import hashlib
import math
import os
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedloss
from fusedloss._memory import peak_memory

try:  # progress bars are optional
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

# Identifiers, numbers, and any other single non-space character (operators, brackets, quotes).
TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
UNK = "<unk>"
CORPUS_BYTES = 8 << 20  # ~1.8M tokens, ~39k distinct: a 32768-token vocabulary covers 99.6% of them
CACHE_FORMAT = 1

# Defaults sized so that both runs together take under two minutes on a 2-core CPU (72 s on an idle
# one here; see the README).
DEFAULTS = dict(steps=120, seq_len=64, batch_size=8, d_model=128, n_layers=2, n_heads=4, vocab_size=32768,
                lr=3e-3, seed=0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

RUNS = (("torch", "head + F.cross_entropy"), ("fused", "fusedloss.linear_cross_entropy"))
# --hf FAMILY: a tiny random-init transformers model of that family instead of TinyGPT, trained unpatched
# (HF's own head and loss) and after fusedloss.integrations.transformers.apply().
HF_RUNS = (("torch", "transformers, unpatched"), ("fused", "fusedloss apply(model)"))
HF_FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}


# ----------------------------------------------------------------------------------------------
# corpus and tokenizer
# ----------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, budget: int = CORPUS_BYTES) -> list[tuple[str, int]]:
    """(relative path, size) of the first standard-library ``.py`` files in sorted path order, until
    ``budget`` bytes. Installed packages are not the standard library and differ between machines."""
    picked, total = [], 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        picked.append((rel.as_posix(), size))
        total += size
        if total >= budget:
            break
    return picked


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedloss"


def _cache_key(files: list[tuple[str, int]], vocab_size: int) -> str:
    h = hashlib.sha256(repr((CACHE_FORMAT, TOKEN_RE.pattern, files)).encode()).hexdigest()[:16]
    return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-{h}.pt"


def build_corpus(root: Path, files: list[tuple[str, int]], vocab_size: int) -> tuple[Tensor, list[str]]:
    """Token ids (int32, files concatenated in order) and the vocabulary (id 0 is ``<unk>``)."""
    tokens: list[str] = []
    for rel, _ in files:
        tokens += TOKEN_RE.findall((root / rel).read_text(encoding="utf-8", errors="replace"))
    counts = collections.Counter(tokens)
    # Ties broken by the token itself, so that the vocabulary never depends on dict order.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
    vocab = [UNK] + [tok for tok, _ in ranked]
    index = {tok: i for i, tok in enumerate(vocab)}
    ids = torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.int32)
    return ids, vocab


def load_corpus(vocab_size: int, log=print) -> tuple[Tensor, list[str], dict]:
    """The tokenized corpus, from the cache when it holds this Python's files at this vocabulary size.

    A missing, read-only or corrupt cache only costs the rebuild (a few seconds): it is never an error.
    """
    root = stdlib_root()
    files = corpus_files(root)
    if not files:
        raise RuntimeError(f"no Python sources found under the standard library at {root}")
    path = cache_dir() / _cache_key(files, vocab_size)
    meta = {"root": str(root), "files": len(files), "bytes": sum(s for _, s in files), "cache": str(path)}
    try:
        blob = torch.load(path, weights_only=True)
        if blob.get("format") == CACHE_FORMAT and blob["ids"].dtype == torch.int32:
            meta["cached"] = True
            return blob["ids"], list(blob["vocab"]), meta
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: rebuild it
        log(f"cache {path} unreadable ({type(exc).__name__}), rebuilding it")
    start = time.perf_counter()
    ids, vocab = build_corpus(root, files, vocab_size)
    meta["cached"] = False
    meta["build_s"] = time.perf_counter() - start
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a temporary file and renamed: a concurrent or interrupted run never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": CACHE_FORMAT, "ids": ids, "vocab": vocab}, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log(f"note: cannot write the token cache {path} ({exc.strerror or exc}); continuing without it")
        meta["cache"] = None
    return ids, vocab, meta


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP, each with a residual."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, final norm; ``head`` is the (V, D) LM head, kept
    out of ``forward`` so that each run decides how the loss consumes it."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, seq_len: int, tie: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def make_hf_model(family: str, vocab: int, d: int, n_layers: int, n_heads: int, seq_len: int, tie: bool):
    """A random-init transformers *ForCausalLM of ``family`` at the demo's sizes (transformers' own init)."""
    import transformers  # noqa: PLC0415 - optional: only the --hf mode needs it

    config_cls, model_cls = HF_FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=d // n_heads,
        max_position_embeddings=max(seq_len, 128), tie_word_embeddings=tie, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)
    return getattr(transformers, model_cls)(config)


def head_loss(kind: str, hidden: Tensor, weight: Tensor, target: Tensor, dtype: torch.dtype) -> Tensor:
    """Mean next-token loss of (N, D) hidden states. The head runs outside autocast in both runs, its
    operands cast to ``dtype`` explicitly, so that the two runs see the same operands."""
    if dtype != hidden.dtype:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if kind == "torch":
        return F.cross_entropy(F.linear(hidden, weight).float(), target)
    return fusedloss.linear_cross_entropy(hidden, weight, target)


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "torch CPU allocator, profiler events"


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def make_batches(ids: Tensor, steps: int, batch: int, seq_len: int, seed: int) -> Tensor:
    """(steps, batch) start offsets, drawn once so that both runs read the very same batches."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ids.numel() - seq_len - 1, (steps, batch), generator=gen)


class Run:
    """One of the two training runs: its own copy of the model and optimizer, stepped from outside."""

    def __init__(self, kind: str, model: nn.Module, ids: Tensor, starts: Tensor, args, device: torch.device):
        self.kind, self.model, self.ids, self.starts, self.device = kind, model, ids, starts, device
        self.hf = bool(getattr(args, "hf", None))
        if self.hf:
            model.train()
            if kind == "fused":
                from fusedloss.integrations import transformers as fl_hf  # noqa: PLC0415 - needs transformers

                fl_hf.apply(model)
        self.dtype = DTYPES[args.dtype]
        self.T = args.seq_len
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.losses: list[Tensor] = []
        self.grads0: dict[str, Tensor] = {}
        self.peak: int | None = None
        self.timed_s, self.timed_steps = 0.0, 0

    def _step(self, i: int) -> None:
        T = self.T
        rows = self.ids[(self.starts[i][:, None] + torch.arange(T + 1)).reshape(-1)].view(-1, T + 1)
        rows = rows.to(self.device, torch.int64)
        x, y = rows[:, :-1], rows[:, 1:].reshape(-1)
        self.opt.zero_grad(set_to_none=True)
        if self.hf:
            # HF shifts the labels itself: the same T-1 next-token targets per row in both runs.
            loss = self.model(input_ids=x, labels=x).loss
        else:
            loss = self._loss(x, y)
        loss.backward()
        if i == 0:
            self.grads0 = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None}
        self.opt.step()
        self.losses.append(loss.detach())

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        with (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
              else contextlib.nullcontext()):
            hidden = self.model(x)
        return head_loss(self.kind, hidden.reshape(-1, hidden.shape[-1]).float(), self.model.head.weight, y,
                         self.dtype)

    def step(self, i: int, *, timed: bool, measure_memory: bool) -> None:
        if measure_memory:
            self.peak = peak_memory(lambda: self._step(i), self.device)
            return
        if not timed:
            self._step(i)
            return
        _sync(self.device)
        start = time.perf_counter()
        self._step(i)
        _sync(self.device)
        self.timed_s += time.perf_counter() - start
        self.timed_steps += 1

    @property
    def steps_per_s(self) -> float | None:
        return self.timed_steps / self.timed_s if self.timed_steps and self.timed_s > 0 else None

    def curve(self) -> Tensor:
        return torch.stack(self.losses).double().cpu()


def train(runs: list[Run], steps: int, progress: bool) -> None:
    """Both runs step by step in turn, so that load from other processes slows both alike.

    Step 0 warms up (first touch, lazy initialisation) and step 1 is the memory measurement (profiled
    on CPU): neither is timed. Steps 2.. are timed, each on its own (synchronized on CUDA).
    """
    measure_at = 1 if steps > 1 else 0
    bar = None
    if progress and _tqdm is not None:
        bar = _tqdm(total=steps, desc="training both", unit="step", dynamic_ncols=True, file=sys.stderr)
    for i in range(steps):
        for r in runs:
            r.step(i, timed=i > measure_at, measure_memory=i == measure_at)
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == steps - 1:  # a host sync: not every step
                bar.set_postfix({r.kind: f"{float(r.losses[-1]):.4f}" for r in runs})
    if bar is not None:
        bar.close()


# ----------------------------------------------------------------------------------------------
# agreement of the two runs
# ----------------------------------------------------------------------------------------------
# Step 0: both runs start from the same weights and batch, so the two losses differ only by how each
# sums in fp32 (BLAS blocking of the head, the order of the log-sum-exp and of the mean). Each logit
# carries a relative error of a few ulps, so each row's loss (lse - z_y, |loss| ~ ln V) one of about
# 1e-6 relative; the mean over rows averages it. conftest's fp32 loss tolerance, 2e-5 relative + 1e-5,
# has 10x margin over that and is the test-suite's own. In bf16 the two heads round differently (torch
# rounds the logits to bf16 before its fp32 loss; fusedloss keeps them in fp32): one bf16 rounding
# moves each logit by at most 2^-9 of itself, so lse and z_y by at most 2^-9 max|z| each, hence the
# loss by at most 2^-8 max|z|, with max|z| taken from the torch run's first logits.
#
# Gradients at step 0 (same weights, same batch): elementwise within 2e-5 relative + 1e-5 of the
# largest |gradient| of each parameter (conftest's fp32 gradient tolerance, with its atol raised
# from 1e-6 to 1e-5 for the head: its (V, D) gradient is a sum over N rows, each an fp32 product,
# summed in a different order and blocking by the two runs).
#
# After step 0 the runs no longer compute on the same weights: each update applies its own rounding,
# Adam divides by sqrt(v), which magnifies rounding in near-zero gradient entries, and training
# amplifies parameter differences. So the curves drift apart slowly, not because either loss is wrong.
# Steps 1..TIGHT_STEPS-1 are still tight (the weights differ by a few ulps times the learning rate):
# TIGHT_RTOL_LATER, 1e-4 relative (measured: 2e-7). Beyond, the curves must agree within LOOSE_RTOL (1%)
# relative: the drift measured with the defaults stays below 1e-6 absolute for ~80 steps and reaches
# 2e-4 relative at step 120, while a wrong loss or gradient shows at once (step 0) or moves the curve
# by far more within a few steps.
TIGHT_STEPS = 5
TIGHT_RTOL, TIGHT_ATOL = 2e-5, 1e-5
TIGHT_RTOL_LATER = 1e-4
LOOSE_RTOL = 1e-2
GRAD_RTOL, GRAD_ATOL = 2e-5, 1e-5


def compare(a: dict, b: dict, dtype: torch.dtype, max_logit: float) -> tuple[bool, list[str]]:
    la, lb = a["losses"], b["losses"]
    diff = (la - lb).abs()
    lines, ok = [], True
    if dtype == torch.float32:
        tol0 = TIGHT_ATOL + TIGHT_RTOL * abs(float(la[0]))
        tight = lambda i: TIGHT_ATOL + (TIGHT_RTOL if i == 0 else TIGHT_RTOL_LATER) * abs(float(la[i]))  # noqa: E731
        why0 = "fp32, summation order only"
    else:
        tol0 = 2.0**-8 * max_logit + TIGHT_ATOL
        tight = lambda i: tol0 * (1 if i == 0 else 4)  # noqa: E731
        why0 = f"bf16 logits rounding bound 2^-8 max|z| = 2^-8 * {max_logit:.2f}"
    n = diff.numel()
    k = min(TIGHT_STEPS, n)
    bad_tight = [i for i in range(k) if diff[i] > tight(i)]
    loose = [LOOSE_RTOL * abs(float(la[i])) for i in range(k, n)]
    bad_loose = [i for i, t in zip(range(k, n), loose) if diff[i] > t]
    lines.append(f"step 0 (same weights, same batch): |loss diff| = {float(diff[0]):.2e}, tolerance {tol0:.2e} "
                 f"({why0}): {'ok' if float(diff[0]) <= tol0 else 'MISMATCH'}")
    # Gradients at step 0 (same weights).
    worst_name, worst = None, 0.0
    g_ok = True
    for name, ga in a["grads0"].items():
        gb = b["grads0"].get(name)
        if gb is None:
            g_ok = False
            worst_name = name
            continue
        scale = float(ga.abs().max()) or 1.0
        err = (ga.double() - gb.double()).abs()
        rtol = GRAD_RTOL if dtype == torch.float32 else 2.0**-7
        allowed = GRAD_ATOL * scale + rtol * ga.double().abs()
        rel = float((err / scale).max())
        if rel > worst:
            worst, worst_name = rel, name
        if bool((err > allowed).any()):
            g_ok = False
    lines.append(f"step 0 gradients: largest difference {worst:.2e} of max|grad| (in {worst_name}); "
                 f"tolerance {GRAD_RTOL if dtype == torch.float32 else 2.0 ** -7:.0e} relative + {GRAD_ATOL:.0e} "
                 f"of max|grad|: {'ok' if g_ok else 'MISMATCH'}")
    if k > 1:
        worst_t = max(range(1, k), key=lambda i: float(diff[i]))
        lines.append(f"steps 1-{k - 1}: max |loss diff| {float(diff[1:k].max()):.2e} (step {worst_t}), tolerance "
                     f"{'1e-4 relative' if dtype == torch.float32 else '4x step 0'}: "
                     f"{'ok' if not any(i >= 1 for i in bad_tight) else 'MISMATCH'}")
    if n > k:
        worst_l = max(range(k, n), key=lambda i: float(diff[i]))
        lines.append(f"steps {k}-{n - 1}: max |loss diff| {float(diff[k:].max()):.2e} (step {worst_l}, "
                     f"{float(diff[worst_l]) / abs(float(la[worst_l])):.1e} relative), tolerance "
                     f"{LOOSE_RTOL:.0%} relative (the trajectories drift apart by rounding): "
                     f"{'ok' if not bad_loose else 'MISMATCH'}")
    ok = not bad_tight and not bad_loose and g_ok
    return ok, lines


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def write_csv(path: Path, a: Tensor, b: Tensor) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_torch", "loss_fusedloss", "abs_diff"])
        for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
            w.writerow([i, f"{x:.9g}", f"{y:.9g}", f"{abs(x - y):.3g}"])


def write_png(path: Path, a: Tensor, b: Tensor, title: str, labels: tuple[str, str] = (RUNS[0][1], RUNS[1][1])
              ) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = range(a.numel())
    ax.plot(steps, a.tolist(), label=labels[0], linewidth=2.5, alpha=0.6)
    ax.plot(steps, b.tolist(), label=labels[1], linewidth=1.0, linestyle="--")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    d = (a - b).abs()
    exact = int((d == 0).sum())
    # log scale: steps where the two losses are bitwise equal have no point
    axd.semilogy(steps, d.masked_fill(d == 0, float("nan")).tolist(), color="gray", marker=".", markersize=3,
                 linewidth=0.8)
    axd.set_ylabel("|difference|")
    if exact:
        axd.set_title(f"{exact} of {d.numel()} steps bitwise equal (not drawn)", fontsize=8)
    axd.set_xlabel("step")
    axd.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"training steps per run (default {d['steps']})")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                   help=f"vocabulary size, <unk> included (default {d['vocab_size']})")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help=f"tokens per sequence (default {d['seq_len']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"sequences per step (default {d['batch_size']})")
    p.add_argument("--d-model", type=int, default=d["d_model"], help=f"model width (default {d['d_model']})")
    p.add_argument("--layers", type=int, default=d["n_layers"], help=f"transformer blocks (default {d['n_layers']})")
    p.add_argument("--heads", type=int, default=d["n_heads"], help=f"attention heads (default {d['n_heads']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"AdamW learning rate (default {d['lr']})")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the token embedding")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="compute dtype of the model body (autocast) and of the head's operands; weights stay "
                        "fp32 (default float32)")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the weights and batches (default {d['seed']})")
    p.add_argument("--out", default="fusedloss-demo", help="output folder (default ./fusedloss-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--hf", default=None, choices=sorted(HF_FAMILIES), metavar="FAMILY",
                   help="train a tiny random-init HuggingFace transformers model of this family ("
                        + ", ".join(sorted(HF_FAMILIES)) + ") unpatched and with "
                        "fusedloss.integrations.transformers.apply(); needs transformers (pip install "
                        "'fusedloss[hf]'); float32 only")


def _validate(args) -> str | None:
    for name in ("steps", "vocab_size", "seq_len", "batch_size", "d_model", "layers", "heads"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.vocab_size < 2:
        return "--vocab-size must be at least 2 (<unk> and one token)"
    if args.d_model % args.heads:
        return f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})"
    if not (args.lr > 0 and math.isfinite(args.lr)):
        return f"--lr must be positive, got {args.lr}"
    if getattr(args, "hf", None):
        if args.dtype != "float32":
            return "--hf runs in float32 only"
        try:
            import transformers  # noqa: F401, PLC0415
        except ImportError:
            return "--hf needs transformers: pip install 'fusedloss[hf]'"
    return None


def run(args) -> int:
    error = _validate(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the output folder {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    ids, vocab, meta = load_corpus(args.vocab_size)
    V = len(vocab)
    print(f"corpus: {meta['files']} files of the Python {sys.version_info.major}.{sys.version_info.minor} standard "
          f"library ({meta['root']}), {meta['bytes'] / 1e6:.1f} MB, {ids.numel():,} tokens, vocabulary {V:,} "
          f"(<unk> {float((ids == 0).double().mean()):.1%} of tokens); "
          + ("cached" if meta.get("cached") else f"tokenized in {meta.get('build_s', 0):.1f} s")
          + (f" ({meta['cache']})" if meta.get("cache") else ""))
    if ids.numel() < args.seq_len + 2:
        print(f"error: the corpus has {ids.numel()} tokens, fewer than --seq-len + 2", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    hf = getattr(args, "hf", None)
    if hf:
        model0 = make_hf_model(hf, V, args.d_model, args.layers, args.heads, args.seq_len, args.tie)
    else:
        model0 = TinyGPT(V, args.d_model, args.layers, args.heads, args.seq_len, args.tie)
    run_labels = HF_RUNS if hf else RUNS
    model_name = type(model0).__name__
    n_params = sum(p.numel() for p in model0.parameters())
    starts = make_batches(ids, args.steps, args.batch_size, args.seq_len, args.seed)
    N = args.batch_size * args.seq_len
    print(("model: " + (f"transformers {model_name}, " if hf else ""))
          + f"{args.layers} blocks, d_model {args.d_model}, {args.heads} heads, seq_len {args.seq_len}, "
          f"head {'tied' if args.tie else 'untied'} ({V} x {args.d_model}), {n_params / 1e6:.2f}M parameters; "
          f"batch {args.batch_size} x {args.seq_len} = {N} tokens a step, {args.steps} steps, AdamW lr {args.lr}, "
          f"{args.dtype}, seed {args.seed}, on {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"))
    print(f"the logits would be {N} x {V} = {N * V * 4 / 2**20:.0f} MiB in fp32; "
          f"fusedloss.linear_cross_entropy never holds them (backend {fusedloss.backends.resolve(None, device)})")

    max_logit = 0.0
    if dtype != torch.float32:
        with torch.no_grad():  # the bf16 rounding bound of compare() needs the first logits' size
            m = model0.to(device)
            idx = ids[(starts[0][:, None] + torch.arange(args.seq_len)).reshape(-1)].view(-1, args.seq_len)
            with torch.autocast(device.type, dtype=dtype):
                h = m(idx.to(device, torch.int64))
            max_logit = float(F.linear(h.float().to(dtype), m.head.weight.to(dtype)).float().abs().max())
    runs = [Run(kind, copy.deepcopy(model0).to(device), ids, starts, args, device) for kind, _ in run_labels]
    del model0
    train(runs, args.steps, progress=not args.no_progress)
    results = {r.kind: {"losses": r.curve(), "grads0": r.grads0, "peak": r.peak, "steps_per_s": r.steps_per_s}
               for r in runs}
    del runs

    a, b = results["torch"], results["fused"]
    ok, lines = compare(a, b, dtype, max_logit)
    print()
    mem_head = f"peak step memory MiB ({memory_label(device)})"
    rows = [["run", "steps/s", "tokens/s", mem_head, "final loss"]]
    for kind, label in run_labels:
        r = results[kind]
        sps = r["steps_per_s"]
        rows.append([label, "-" if sps is None else f"{sps:.2f}", "-" if sps is None else f"{sps * N:,.0f}",
                     _mib(r["peak"]), f"{float(r['losses'][-1]):.4f}"])
    print_table(rows)
    print(f"(steps/s over steps 2..{args.steps - 1}: step 0 warms up, step 1 is the memory measurement; peak "
          "memory = most bytes held during one training step above what was held before it, so weights and "
          "optimizer state are not counted)")
    if a["peak"] and b["peak"] and a["steps_per_s"] and b["steps_per_s"]:
        print(f">>> {run_labels[1][1]}: {b['steps_per_s'] / a['steps_per_s']:.2f}x the speed, "
              f"{b['peak'] / a['peak']:.2f}x the peak step memory of {run_labels[0][1]}")
    print()
    diff = (a["losses"] - b["losses"]).abs()
    print(f"loss curves: max |difference| {float(diff.max()):.2e} over {diff.numel()} steps "
          f"(step {int(diff.argmax())}); {'within' if ok else 'NOT within'} tolerance:")
    for line in lines:
        print("  " + line)
    csv_path, png_path = out / "losses.csv", out / "loss_curves.png"
    try:
        write_csv(csv_path, a["losses"], b["losses"])
        title = (f"{model_name} on Python stdlib sources: V={V}, d={args.d_model}, {args.layers} blocks, "
                 f"{N} tokens/step, "
                 f"{args.dtype}, {device.type}")
        png_error = write_png(png_path, a["losses"], b["losses"], title, (run_labels[0][1], run_labels[1][1]))
    except OSError as exc:
        print(f"error: cannot write to {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_error is None else f" (no PNG: {png_error})"))
    print(f"demo: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - wall:.0f} s")
    return 0 if ok else 1
