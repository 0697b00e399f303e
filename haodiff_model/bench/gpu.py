"""``python -m haodiff_model.bench.gpu [--json] [--steps N]``: stage-1 training speed and prompt latency.

1. Stage-1 training step (forward, loss, backward, clipping, Adam) on a synthetic batch of 16
   512x512 images, exactly the trainer's `dpg_train_step`:
   - ours: sdpa window attention, bf16 autocast, fused Adam, the compiled LayerNorm/FAVOR kernels;
   - baselines: the same network computed the straightforward way: explicit fp32 attention
     matrices as the official code does, fp32, eager PyTorch kernels (HAODIFF_COMPILE=0), for-each
     Adam; once with PyTorch's default TF32 settings (matmul off, cuDNN on) and once with TF32 on
     for both, as the official code sets it. If a batch does not fit, it is halved until it does
     (reported), and the speed-up is compared per sample against the faster baseline.
   Reports iterations/s, samples/s and torch.cuda.max_memory_allocated; target: >= 3x per sample.
2. DualPromptEncoder (frozen DPG + both prompt embedders) forward at batch 1 in bf16: eager under
   autocast, eager with bf16 weights, a CUDA graph of that, torch.compile, and a CUDA graph of the
   compiled module; median ms over --runs after warm-up. Target: <= 15 ms.

Without CUDA the same code runs on tiny configs as a smoke test (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from haodiff_model.losses.losses import Stage1Loss
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.nets.layers import compiled_kernels
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig
from haodiff_model.train.dpg import dpg_train_step

TRAIN_SPEEDUP_TARGET = 3.0
PROMPT_MS_TARGET = 15.0
PROMPT_BATCH = 8  # the batched figure is reported per image; the target is for batch 1
TINY_DPG = DPGConfig(img_size=64, embed_dim=12, depths=(2, 2, 1, 1), num_heads=(3, 3, 2, 2), window_size=8)
TINY_PROMPT = PromptEmbedderConfig(dim_head=16, embed_dim=32, out_tokens=5, num_layers=2, num_heads_performer=2,
                                   num_heads_pool=4, pool_patch=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthetic_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stage-1 batch with the loader's value ranges: hq, lq in [-1, 1], residual = lq - hq, binary mask."""
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    lq = (hq + 0.2 * torch.randn(batch, 3, size, size, generator=g)).clamp(-1, 1)
    mask = (torch.rand(batch, 1, size, size, generator=g) < 0.3).float()
    return {k: v.to(device) for k, v in {"hq": hq, "lq": lq, "residual": lq - hq, "mask": mask}.items()}


def _train_once(cfg: DPGConfig, batch: int, steps: int, warmup: int, device: torch.device,
                amp_dtype: torch.dtype | None, fused: bool) -> dict[str, Any]:
    model = DPGNetwork(cfg, torch.Generator().manual_seed(0)).to(device)
    model.train()
    model.set_drop_path_generator(torch.Generator(device=device).manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True if fused else None,
                           foreach=None if fused else True)
    data = synthetic_batch(batch, cfg.img_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        dpg_train_step(model, opt, data, Stage1Loss(), 1.0, amp_dtype, device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = dpg_train_step(model, opt, data, Stage1Loss(), 1.0, amp_dtype, device)
    _sync(device)
    elapsed = time.perf_counter() - start
    out = {"batch": batch, "steps": steps, "it_per_s": steps / elapsed, "samples_per_s": steps * batch / elapsed,
           "ms_per_step": 1e3 * elapsed / steps, "final_loss": float(loss)}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bench_train(cfg: DPGConfig, batch: int, steps: int, warmup: int, device: torch.device,
                fast: bool, tf32_matmul: bool = False) -> dict[str, Any]:
    """One configuration; on CUDA out-of-memory the batch is halved until it fits (reported in `oom_at`).
    cuDNN's TF32 stays on (PyTorch's default); `tf32_matmul` also lets matrix products use it."""
    cfg = dataclasses.replace(cfg, attention="sdpa" if fast else "explicit")
    amp = torch.bfloat16 if fast and device.type == "cuda" else None
    oom: list[int] = []
    while batch >= 1:
        try:
            with compiled_kernels(fast), tf32(tf32_matmul, True):
                result = _train_once(cfg, batch, steps, warmup, device, amp, fused=fast and device.type == "cuda")
            result["oom_at"] = oom
            break
        except torch.cuda.OutOfMemoryError:
            oom.append(batch)
            batch //= 2
        finally:
            _free(device)
    else:
        result = {"error": f"out of memory at every batch size {oom}", "oom_at": oom}
    result.update(attention=cfg.attention, precision="bf16 autocast" if amp else "tf32" if tf32_matmul else "fp32",
                  kernels="compiled" if fast and device.type == "cuda" else "eager")
    return result


def _time_calls(fn: Callable[[], Any], runs: int, warmup: int, device: torch.device) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[min(len(times) - 1, (9 * len(times)) // 10)], "runs": runs}


def _cuda_graph(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Capture fn (static inputs) in a CUDA graph; returns (replay, the graph's static output)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, lambda: out


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _keep_last(fn: Callable[[], Any]) -> tuple[Callable[[], None], Callable[[], Any]]:
    """(call, output): call runs fn and keeps its result, output returns the last one."""
    last: dict[str, Any] = {}

    def call() -> None:
        last["out"] = fn()
    return call, lambda: last["out"]


def bench_prompt(dpg: DPGConfig, prompt: PromptEmbedderConfig, runs: int, warmup: int, device: torch.device,
                 compile_model: bool) -> dict[str, Any]:
    """Batch-1 bf16 latency of DualPromptEncoder variants; each variant's output is compared with eager bf16."""
    enc = DualPromptEncoder(dpg, prompt).to(device).eval()
    x = (torch.rand(1, 3, dpg.img_size, dpg.img_size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    variants: dict[str, dict[str, Any]] = {}

    def measure(name: str, make: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]],
                reference: tuple[torch.Tensor, ...] | None = None) -> Any:
        try:
            call, output = make()  # capture / compilation happens here or in the warm-up calls
            variants[name] = _time_calls(call, runs, warmup, device)
            out = output()
            if reference is not None:
                variants[name]["max_abs_diff_vs_eager"] = _max_diff(out, reference)
            return out
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            return None

    def autocast_forward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return enc(x)

    with torch.inference_mode():
        measure("eager_autocast", lambda: _keep_last(autocast_forward))
    with torch.no_grad():  # parameters converted under inference_mode would lose their version counters
        enc.to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    with torch.inference_mode():
        reference = measure("eager_bf16", lambda: _keep_last(lambda: enc(x16)))
        if device.type == "cuda":
            measure("cuda_graph_bf16", lambda: _cuda_graph(lambda: enc(x16), device), reference)
        else:
            variants["cuda_graph_bf16"] = {"skipped": "needs CUDA"}
        if device.type == "cuda" and compile_model:
            compiled = torch.compile(enc)
            measure("compile_bf16", lambda: _keep_last(lambda: compiled(x16)), reference)
            measure("compile_cuda_graph_bf16", lambda: _cuda_graph(lambda: compiled(x16), device), reference)
        else:
            reason = "needs CUDA" if device.type != "cuda" else "--no-compile"
            variants["compile_bf16"] = {"skipped": reason}
            variants["compile_cuda_graph_bf16"] = {"skipped": reason}
        x8 = x16.expand(PROMPT_BATCH, -1, -1, -1).contiguous()
        if device.type == "cuda":
            measure(f"cuda_graph_bf16_batch{PROMPT_BATCH}", lambda: _cuda_graph(lambda: enc(x8), device))
        else:
            measure(f"eager_bf16_batch{PROMPT_BATCH}", lambda: _keep_last(lambda: enc(x8)))
    batched = next(v for k, v in variants.items() if k.endswith(f"batch{PROMPT_BATCH}"))
    if "median_ms" in batched:
        batched["ms_per_image"] = batched["median_ms"] / PROMPT_BATCH

    timed = {k: v["median_ms"] for k, v in variants.items() if "median_ms" in v and "ms_per_image" not in v}
    best = min(timed, key=timed.get) if timed else None
    return {"variants": variants, "best": best, "best_ms": timed.get(best), "target_ms": PROMPT_MS_TARGET,
            "pass": None if device.type != "cuda" else best is not None and timed[best] <= PROMPT_MS_TARGET}


def profile_tables(dpg: DPGConfig, prompt: PromptEmbedderConfig, batch: int, device: torch.device,
                   rows: int = 25) -> str:
    """torch.profiler tables (self device time per op) of two of our training steps and of five bf16
    batch-1 prompt-encoder forwards, after warm-up: where the remaining time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    cfg = dataclasses.replace(dpg, attention="sdpa")
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = DPGNetwork(cfg, torch.Generator().manual_seed(0)).to(device).train()
    model.set_drop_path_generator(torch.Generator(device=device).manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True if device.type == "cuda" else None)
    data = synthetic_batch(batch, cfg.img_size, device)
    for _ in range(3):
        dpg_train_step(model, opt, data, Stage1Loss(), 1.0, amp, device)
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(2):
            dpg_train_step(model, opt, data, Stage1Loss(), 1.0, amp, device)
        _sync(device)
    out = [f"training step, batch {batch}, 2 steps:", prof.key_averages().table(sort_by=sort, row_limit=rows)]
    del model, opt, data
    _free(device)
    enc = DualPromptEncoder(dpg, prompt).to(device).eval()
    with torch.no_grad():
        enc.to(torch.bfloat16)
    x = torch.zeros(1, 3, dpg.img_size, dpg.img_size, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            enc(x)
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(5):
                enc(x)
            _sync(device)
    out += ["prompt encoder, batch 1 bf16, 5 forwards:", prof.key_averages().table(sort_by=sort, row_limit=rows)]
    return "\n".join(out)


def run_benchmarks(steps: int, warmup: int, runs: int, batch: int, compile_model: bool,
                   device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = device.type != "cuda"
    dpg, prompt = (TINY_DPG, TINY_PROMPT) if smoke else (DPGConfig(), PromptEmbedderConfig())
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if not smoke else "cpu",
        "smoke_test": smoke,
        "torch": torch.__version__,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "train_config": {"img_size": dpg.img_size, "embed_dim": dpg.embed_dim, "depths": list(dpg.depths),
                         "batch": batch},
    }
    fast = bench_train(dpg, batch, steps, warmup, device, fast=True)
    base = bench_train(dpg, batch, steps, warmup, device, fast=False)
    base_tf32 = bench_train(dpg, batch, steps, warmup, device, fast=False, tf32_matmul=True)
    rates = [b["samples_per_s"] for b in (base, base_tf32) if "samples_per_s" in b]
    speedup = fast["samples_per_s"] / max(rates) if "samples_per_s" in fast and rates else None
    report["train"] = {"ours": fast, "baseline": base, "baseline_tf32": base_tf32, "speedup_per_sample": speedup,
                       "target": TRAIN_SPEEDUP_TARGET,
                       "pass": None if smoke else speedup is not None and speedup >= TRAIN_SPEEDUP_TARGET}
    report["prompt"] = bench_prompt(dpg, prompt, runs, warmup, device, compile_model)
    _free(device)
    return report


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"


def _verdict(passed: bool | None) -> str:
    return "n/a, smoke test" if passed is None else "PASS" if passed else "FAIL"


def format_report(r: dict[str, Any]) -> str:
    lines = []
    if r["smoke_test"]:
        lines.append("CPU smoke test: tiny configs, no CUDA; the numbers below mean nothing.")
    lines.append(f"device: {r['device']}  torch {r['torch']}  TF32 matmul/cudnn: {r['tf32']['matmul']}/"
                 f"{r['tf32']['cudnn']}")
    c = r["train_config"]
    lines.append(f"stage-1 training step, {c['img_size']}x{c['img_size']}, requested batch {c['batch']}:")
    lines.append(f"  {'':14}{'attention':>10}{'precision':>15}{'batch':>7}{'it/s':>9}{'samples/s':>11}"
                 f"{'ms/step':>9}{'peak GiB':>10}  OOM at")
    for name in ("ours", "baseline", "baseline_tf32"):
        m = r["train"][name]
        if "error" in m:
            lines.append(f"  {name:14}{m['error']}")
            continue
        lines.append(f"  {name:14}{m['attention']:>10}{m['precision']:>15}{m['batch']:>7}{_fmt(m['it_per_s'], '.3f'):>9}"
                     f"{_fmt(m['samples_per_s'], '.2f'):>11}{_fmt(m['ms_per_step'], '.1f'):>9}"
                     f"{_fmt(m.get('peak_mem_gib'), '.2f'):>10}  {m['oom_at'] or '-'}")
    t = r["train"]
    lines.append(f"  speed-up per sample vs the faster baseline: {_fmt(t['speedup_per_sample'], '.2f')}x (target >= {t['target']}x: "
                 f"{_verdict(t['pass'])})")
    p = r["prompt"]
    lines.append("DualPromptEncoder forward, bf16, batch 1 unless named (median / p10 / p90 ms):")
    for name, v in p["variants"].items():
        if "median_ms" in v:
            diff = v.get("max_abs_diff_vs_eager")
            lines.append(f"  {name:26}{v['median_ms']:8.2f}{v['p10_ms']:8.2f}{v['p90_ms']:8.2f}"
                         + (f"   max |diff| vs eager {diff:.3g}" if diff is not None else "")
                         + (f"   {v['ms_per_image']:.2f} ms per image" if "ms_per_image" in v else ""))
        else:
            lines.append(f"  {name:26}{v.get('error') or 'skipped: ' + v['skipped']}")
    lines.append(f"  best: {p['best']} {_fmt(p['best_ms'], '.2f')} ms (target <= {p['target_ms']} ms: "
                 f"{_verdict(p['pass'])})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haodiff_model.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10; CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps/calls first (default: 3; CPU 1)")
    parser.add_argument("--runs", type=int, default=None, help="timed prompt-encoder calls (default: 50; CPU 3)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 16; CPU 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the whole-model torch.compile variants")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler tables of our training step and of the prompt encoder")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    steps = args.steps if args.steps is not None else (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    runs = args.runs if args.runs is not None else (50 if cuda else 3)
    batch = args.batch if args.batch is not None else (16 if cuda else 2)
    if min(steps, runs, batch) < 1 or warmup < 0:
        parser.error("--steps, --runs and --batch must be >= 1, --warmup >= 0")
    if args.profile:
        device = torch.device("cuda" if cuda else "cpu")
        print(profile_tables(DPGConfig() if cuda else TINY_DPG, PromptEmbedderConfig() if cuda else TINY_PROMPT,
                             batch, device))
        return 0
    report = run_benchmarks(steps, warmup, runs, batch, not args.no_compile)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
