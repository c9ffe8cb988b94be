"""gitmodel vs transformers' GitForCausalLM.generate on the same random-weight git-base-shaped model.

Same weights (ours is loaded from the checkpoint transformers saves), same batch, device and dtype,
exactly `--new-tokens` tokens (EOS disabled in both), greedy unless `--beams`. Prints images/s for
both, the ratio, and how many rows got identical tokens. The last lines are a table.

  python bench/bench_generate.py --device cpu --dtype float32 --batch-sizes 8           # CPU target
  python bench/bench_generate.py --device cuda --dtype bfloat16 --batch-sizes 64 256    # GPU target
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gitmodel  # noqa: E402
from gitmodel.generation import prefill  # noqa: E402


def build_models(device: str, dtype: torch.dtype, large: bool):
    import transformers

    config = transformers.GitConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
        if large
        else {}
    )
    torch.manual_seed(0)
    reference = transformers.GitForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = gitmodel.GitForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    reference = reference.to(device=device, dtype=dtype)
    reference.generation_config.eos_token_id = None  # exactly new_tokens tokens, as ours below
    return reference, ours


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    """Best of `repeats` timed calls after a warm-up: robust to other work sharing the machine."""
    (best, out), = timed_in_turns([fn], repeats, device)
    return best, out


def timed_in_turns(fns, repeats: int, device: str) -> list[tuple[float, object]]:
    """Best time and output of each function, timed in turns (a, b, a, b, ...) after one warm-up call each
    (and CUDA graph capture), so that a machine whose speed drifts slows all of them alike."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            outs[i] = fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def print_profile(fn, device: str) -> None:
    """The kernels (or CPU ops) of one call, most time first: where a further speed-up has to come from."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    sort_by = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--reference-batch-sizes", type=int, nargs="*", default=None, help="default: same as --batch-sizes")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision tower and the decoder's dense parts")
    parser.add_argument("--large", action="store_true", help="git-large shape instead of git-base")
    parser.add_argument("--profile", action="store_true",
                        help="print the kernels of one call at the largest batch, most time first")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.set_grad_enabled(False)

    reference, ours = build_models(args.device, dtype, args.large)
    ours.prepare_for_inference(cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    settings = dict(max_new_tokens=args.new_tokens, num_beams=args.beams)

    rows = []
    reference_sizes = args.batch_sizes if args.reference_batch_sizes is None else args.reference_batch_sizes
    for batch in args.batch_sizes:
        pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to(args.device, dtype)
        run_ours = lambda: ours.generate(pixels, eos_token_id=[], **settings)  # noqa: E731
        row = dict(batch=batch, ours=None, reference=None, ratio=None, same=None)
        if batch in reference_sizes:
            run_reference = lambda: reference.generate(pixel_values=pixels, **settings)  # noqa: E731
            (ours_s, ours_ids), (ref_s, ref_ids) = timed_in_turns([run_ours, run_reference], args.repeats, args.device)
            row.update(ours=batch / ours_s, reference=batch / ref_s, ratio=ref_s / ours_s)
            row["same"] = (ours_ids.cpu() == ref_ids.cpu()).all(dim=1).float().mean().item() if ours_ids.shape == ref_ids.shape else 0.0
        else:
            row["ours"] = batch / timed(run_ours, args.repeats, args.device)[0]
        rows.append(row)
        print(row, flush=True)

    vision_batch = max(args.batch_sizes)
    pixels = torch.randn(vision_batch, 3, 224, 224).to(args.device, dtype)
    vision_s, _ = timed(lambda: ours.git.image_encoder(pixels), args.repeats, args.device)
    # Where the time goes at the largest batch: vision tower, + decoder prefill, + decode steps.
    prompt = torch.full((vision_batch, 1), ours.config.bos_token_id, device=args.device)
    prefill_s, _ = timed(
        lambda: prefill(ours, pixels, prompt, torch.ones_like(prompt), 1, args.new_tokens), args.repeats, args.device
    )
    total_s, _ = timed(lambda: ours.generate(pixels, eos_token_id=[], **settings), args.repeats, args.device)
    if args.profile:
        print_profile(lambda: ours.generate(pixels, eos_token_id=[], **settings), args.device)

    shape = "git-large" if args.large else "git-base"
    print(f"\n{shape} shape, random weights, {dtype}, {'greedy' if args.beams == 1 else f'beam {args.beams}'}, "
          f"{args.new_tokens} new tokens, {machine}, torch {torch.__version__}")
    print(f"cuda graphs: {args.device.startswith('cuda') and not args.no_cuda_graphs}, torch.compile: {args.compile}")
    print("| batch | gitmodel img/s | transformers img/s | ratio | rows with identical tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['reference']:,.1f}" if r["reference"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        same = f"{r['same']:.0%}" if r["same"] is not None else "-"
        print(f"| {r['batch']} | {r['ours']:,.1f} | {ref} | {ratio} | {same} |")
    print(f"| vision tower alone, batch {vision_batch} | {vision_batch / vision_s:,.1f} | | | |")
    print(f"batch {vision_batch} ms: vision {vision_s * 1e3:.1f}, decoder prefill {(prefill_s - vision_s) * 1e3:.1f}, "
          f"decode steps {(total_s - prefill_s) * 1e3:.1f}, total {total_s * 1e3:.1f}")


if __name__ == "__main__":
    main()
