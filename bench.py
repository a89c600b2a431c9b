"""
Benchmark of the two meta-gradient modes: time and peak memory of one meta-gradient (eq. 4) against the number of
inner steps K, on the default model size (random weights: cost does not depend on training).

Each (mode, K) runs in a fresh process, so that one measurement's peak cannot mask another's. peak_mb is the growth
of the process's peak resident memory during the first meta-gradient over what the process held before it.
rel_err_vs_unroll compares dL_out/dw with the unroll mode's, computed in float64 (the modes are the same algorithm,
so float32 round-off would only measure summation order); rel_err_float32 is the same comparison in float32.

    python bench.py              # prints a table, writes bench.json
"""
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

import base_model
import tasks
from inner_loop import encode, init_lora, lora_targets
from meta_step import attribution

KS = [1, 2, 4, 8, 16]
MODES = ["unroll", "replay"]
M, ALPHA, RANK, REPEATS = 8, 0.03, 4, 5


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def setup(dtype):
    tok = base_model.build_tokenizer()
    model = base_model.build_model(len(tok)).to(dtype).eval().requires_grad_(False)  # the default size
    rng = random.Random(0)
    _, target, answer = tasks.heldout_targets(1, seed=0)[0]
    examples = [tasks.sample_problem(rng, tasks.domain_of(target)) for _ in range(M)]
    batch = encode(tok, [tasks.BOS + p for p, _ in examples], [a + "\n" for _, a in examples])
    target_batch = encode(tok, [tasks.BOS + target], [answer + "\n"])
    phi0 = {n: p.to(dtype) for n, p in init_lora(model, lora_targets(model), RANK, seed=1).items()}
    return model, phi0, batch, target_batch, torch.ones(M, dtype=dtype)


def measure(mode, K):
    """One (mode, K) in this process: peak memory of the first call, median time of the next REPEATS."""
    torch.set_num_threads(1)
    model, phi0, batch, target_batch, w = setup(torch.float32)
    before = rss_mb()
    _, g32 = attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before     # ru_maxrss is in KiB on Linux
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
        times.append(time.perf_counter() - start)
    model, phi0, batch, target_batch, w = setup(torch.float64)
    _, g64 = attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
    return {"mode": mode, "K": K, "seconds": statistics.median(times), "peak_mb": peak,
            "g32": g32.tolist(), "g64": g64.tolist()}


def rel_err(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def main():
    rows = []
    for K in KS:
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--one", mode, str(K)], capture_output=True, text=True,
                                   check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"measured {mode} K={K}", file=sys.stderr)
    unroll = {r["K"]: r for r in rows if r["mode"] == "unroll"}
    for r in rows:
        r["rel_err_vs_unroll"] = rel_err(r.pop("g64"), unroll[r["K"]]["g64"]) if r["mode"] != "unroll" else 0.0
        r["rel_err_float32"] = rel_err(r["g32"], unroll[r["K"]]["g32"])
    for r in rows:
        r.pop("g32")
    with open("bench.json", "w") as f:
        json.dump(rows, f, indent=1)
    print(f"one meta-gradient, m = {M}, LoRA rank {RANK} on q/v, default model, 1 thread; median of {REPEATS}")
    print(f"{'mode':8s} {'K':>3s} {'seconds':>9s} {'peak MB':>9s} {'rel err (f64)':>14s} {'rel err (f32)':>14s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['K']:3d} {r['seconds']:9.3f} {r['peak_mb']:9.1f} "
              f"{r['rel_err_vs_unroll']:14.1e} {r['rel_err_float32']:14.1e}")
    print("wrote bench.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
