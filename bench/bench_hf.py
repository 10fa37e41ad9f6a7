"""A HuggingFace causal LM's training step, unpatched vs ``fusedloss.integrations.transformers.apply``.

    python bench/bench_hf.py                           # Llama config, V=128256 and V=262144, D=512, 2 layers
    python bench/bench_hf.py --vocab 128256 --reps 3   # one vocabulary
    python bench/bench_hf.py --family qwen3 --device cuda --dtype bfloat16 --hidden 2048 --batch 8 --seq 1024

One random-init model per vocabulary (transformers' own init, seeded), one batch of random tokens as labels.
A step is ``model(input_ids=..., labels=...).loss.backward()`` with the gradients cleared before it (as
``zero_grad()`` does), no optimizer. The two runs alternate on the same model instance (``apply`` then
``revert`` between them), so they see the same weights, batch and machine state. Time: the median of
``--reps`` steps after one warm-up step each. Peak memory: one more step each, measured as the benchmarks
measure it (bench/common.py: bytes held above what was held before the step, PyTorch's CPU allocator
events or the CUDA allocator's peak), which includes the parameter gradients both runs create. The loss
of the two runs is printed too: they must agree to float32 rounding. The rows also go to a CSV
(``--out``, default ``bench/results/hf-<family>-<device>-<date>.csv``; ``--no-csv`` to skip), with every
timed step and the machine's 1-minute load average before each one (2 threads of ours add about 2; well
above that, other work shared the CPU and both runs' times are inflated).

On CUDA the peers join the alternation where they are installed (``--peers``, default both), each
patching only the loss so that every run shares the same trunk:
- ``liger``: Liger-Kernel's ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, rope=False,
  rms_norm=False, swiglu=False, model=model)`` (Llama family only), which sets the instance's ``forward``;
  undone by deleting that attribute.
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(hidden, lm_head.weight, labels, shift=True,
  impl="cce")`` (its default gradient filter) on the final hidden states (``model.model``), from a ``forward`` set on the instance: the
  PyPI wheel (25.1.1) has no ``cce_patch``, which is only in its source tree. The same loss as HF's (the
  shifted mean over the labels that are not -100).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common

FAMILIES = {  # family -> (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
}


def make_model(transformers, family: str, vocab: int, hidden: int, layers: int, dtype, device):
    config_cls, model_cls, extra = FAMILIES[family]
    heads = max(1, hidden // 64)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=64, max_position_embeddings=8192,
        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(device=device, dtype=dtype)
    model.train()
    return model


def _liger(model):
    from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: PLC0415 - optional peer

    if type(model).__name__ != "LlamaForCausalLM":
        raise ValueError(f"liger: this benchmark patches Llama only, not {type(model).__name__}")

    def patch():
        apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, rope=False, rms_norm=False, swiglu=False,
                                    model=model)

    def unpatch():
        del model.forward  # the instance attribute Liger set; the class's forward shows through again

    return patch, unpatch


def _cce(model):
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415 - optional peer

    if model.lm_head.bias is not None:
        raise ValueError("cce: its linear_cross_entropy takes no bias")

    def forward(input_ids=None, labels=None, **kwargs):
        hidden = model.model(input_ids=input_ids, **kwargs).last_hidden_state
        loss = linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=True, impl="cce")
        return transformers_output(loss=loss)

    def patch():
        model.forward = forward

    def unpatch():
        del model.forward

    return patch, unpatch


def transformers_output(**fields):
    from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: PLC0415

    return CausalLMOutputWithPast(**fields)


PEERS = {"liger": ("liger_kernel", _liger), "cce": ("cut_cross_entropy", _cce)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--vocab", default="128256,262144", help="comma-separated vocabulary sizes")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--backend", default=None, help="fusedloss backend (default: automatic)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: bench/results/hf-<family>-"
                        "<device>-<date>.csv)")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--peers", default="liger,cce",
                        help="peers raced on CUDA where installed (comma-separated, '' for none)")
    args = parser.parse_args(argv)

    import transformers  # noqa: PLC0415 - optional dependency of this script only

    from fusedloss.integrations import transformers as fl_hf  # noqa: PLC0415

    dtype = getattr(torch, args.dtype)
    print(f"# {args.family}: D={args.hidden}, {args.layers} layers, B={args.batch}, T={args.seq} "
          f"(B*T={args.batch * args.seq}), {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"# command: python bench/bench_hf.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    header = f"{'V':>7} {'run':>10} {'step s':>8} {'peak MiB':>9} {'loss':>10} {'time vs HF':>11} {'memory vs HF':>13}"
    print(header)
    rows = []
    versions, sha = common.versions(), common.git_sha()  # of the code as it was when the run started
    for vocab in [int(v) for v in args.vocab.split(",")]:
        model = make_model(transformers, args.family, vocab, args.hidden, args.layers, dtype, args.device)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()

        def clear():
            for p in model.parameters():
                p.grad = None

        # run name -> (patch, unpatch) of the model instance
        runs = {"unpatched": (lambda: None, lambda: None),
                "apply": (lambda: fl_hf.apply(model, backend=args.backend), lambda: fl_hf.revert(model))}
        if args.device.startswith("cuda"):
            for peer in [p for p in args.peers.split(",") if p]:
                module, make = PEERS[peer]
                if not common.importable(module):
                    print(f"# {peer}: {module} is not installed, left out")
                    continue
                try:
                    runs[peer] = make(model)
                except Exception as exc:  # noqa: BLE001 - one failing peer must not stop the race
                    print(f"# {peer}: left out: {type(exc).__name__}: {exc}")

        def run(name: str):
            patch, unpatch = runs[name]
            patch()
            try:
                clear()
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                return out.loss.detach().float().item()
            finally:
                unpatch()

        losses = {}
        for name in list(runs):  # warm-up, and the loss each run computes
            try:
                losses[name] = run(name)
            except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported and left out
                if name in ("unpatched", "apply"):
                    raise
                print(f"# {name}: left out, its step failed: {type(exc).__name__}: {exc}")
                del runs[name]
        names = tuple(runs)
        times = {name: [] for name in names}
        loads = {name: [] for name in names}
        for _ in range(args.reps):
            for name in names:
                patch, unpatch = runs[name]
                clear()
                patch()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                loads[name].append(os.getloadavg()[0])
                t0 = time.perf_counter()
                step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                unpatch()
        peaks = {}
        for name in names:
            patch, unpatch = runs[name]
            clear()
            patch()
            peaks[name] = common.peak_memory(step, args.device)
            unpatch()
        clear()
        base_t = statistics.median(times["unpatched"])
        for name in names:
            t = statistics.median(times[name])
            peak = peaks[name]
            mib = f"{peak / 2**20:9.0f}" if peak is not None else f"{'n/a':>9}"
            mem_ratio = f"{peak / peaks['unpatched']:12.3f}x" if peak and peaks["unpatched"] else f"{'':>13}"
            print(f"{vocab:>7} {name:>10} {t:8.2f} {mib} {losses[name]:10.5f} {base_t / t:10.2f}x {mem_ratio}",
                  flush=True)
            rows.append({
                "family": args.family, "V": vocab, "D": args.hidden, "layers": args.layers, "B": args.batch,
                "T": args.seq, "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
                "run": name, "step s (median)": f"{t:.3f}",
                "step s (all)": " ".join(f"{x:.3f}" for x in times[name]),
                "peak MiB": f"{peak / 2**20:.1f}" if peak is not None else "",
                "loss": f"{losses[name]:.6f}", "time vs HF": f"{base_t / t:.3f}",
                "memory vs HF": f"{peak / peaks['unpatched']:.4f}" if peak and peaks["unpatched"] else "",
                "load avg before each step": " ".join(f"{x:.2f}" for x in loads[name]),
                "versions": versions, "git sha": sha,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
        del model
    print("# time vs HF: the unpatched step time / this step time (higher is faster); memory vs HF: this peak / "
          "the unpatched peak")
    if not args.no_csv:
        path = args.out or (Path(common.DEFAULT_OUT) /
                            f"hf-{args.family}-{args.device.split(':')[0]}-{datetime.date.today().isoformat()}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
