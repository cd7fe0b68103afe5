"""Memory and time of the chunked logit lens vs the naive full ``[pos, vocab]`` softmax.

The pure core on random tensors (no model): residuals ``[pos, d_model]``, an RMS final norm,
``W_U`` ``[d_model, vocab]`` and bias, k = 10 and 5 targets per position. Every
(rival, positions, vocabulary) runs in a fresh subprocess that allocates the inputs, resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs once, and reports the peak
resident memory above the inputs (``VmHWM`` minus ``VmRSS`` before the run) and the time.
The chunked lens uses its default chunks (256 positions x 32768 vocabulary entries).

    python bench/logit_lens_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

D_MODEL, K, N_TARGETS = 256, 10, 5


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(rival: str, n_pos: int, vocab: int) -> None:
    import torch

    from mm_lens.analysis.lens_core import lens_logits_stats

    g = torch.Generator().manual_seed(0)
    resid = torch.randn(n_pos, D_MODEL, generator=g)
    W_U = torch.randn(vocab, D_MODEL, generator=g).T  # a view of an lm_head weight, as in a model
    b_U = torch.randn(vocab, generator=g)
    weight = torch.rand(D_MODEL, generator=g)
    targets = torch.randint(0, vocab, (n_pos, N_TARGETS), generator=g)

    def norm(x):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def naive():
        logits = norm(resid) @ W_U + b_U
        logprobs = logits.log_softmax(-1)
        entropy = -(logprobs.exp().mul_(logprobs)).sum(-1)
        top = logprobs.topk(K)
        target_logits = logits.gather(1, targets)
        ranks = torch.stack([(logits > target_logits[:, j : j + 1]).sum(-1) for j in range(N_TARGETS)], 1)
        return entropy, top, logprobs.gather(1, targets), ranks

    def chunked():
        return lens_logits_stats(resid, norm, W_U, b_U, k=K, targets=targets)

    # warm-up on a slice (pages in the kernels' code and thread pools), then measure
    rival_fn = {"naive": naive, "chunked": chunked}[rival]
    inputs = resid, W_U, b_U, targets
    resid, W_U, b_U, targets = resid[:8], W_U[:, :4096], b_U[:4096], targets[:8] % 4096
    rival_fn()
    resid, W_U, b_U, targets = inputs
    del inputs
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # peak RSS := current RSS
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    rival_fn()
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_mb": _status_mb("VmHWM") - before, "seconds": seconds, "inputs_mb": before}))


def run(rival: str, n_pos: int, vocab: int) -> dict:
    # big blocks straight from mmap, so freed tensors leave the resident set at once and the
    # peak measures live tensors, not glibc's heap growth (its dynamic mmap threshold)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, __file__, "--child", rival, str(n_pos), str(vocab)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 30 s)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rival, n_pos, vocab = args.child
        return child(rival, int(n_pos), int(vocab))

    positions = (256, 1024) if args.quick else (1024, 4096)
    vocabs = (32000, 65536) if args.quick else (32000, 152064)
    results = {}
    print(f"d_model {D_MODEL}, k {K}, {N_TARGETS} targets/position, float32; extra = peak RSS above the inputs")
    print(f"{'positions':>9} {'vocab':>7} {'[pos,vocab] MB':>14} {'chunked MB':>10} {'naive MB':>9} {'chunked s':>9} {'naive s':>8}")
    for n_pos in positions:
        for vocab in vocabs:
            chunked, naive = run("chunked", n_pos, vocab), run("naive", n_pos, vocab)
            results[n_pos, vocab] = chunked, naive
            print(f"{n_pos:>9} {vocab:>7} {n_pos * vocab * 4 / 2**20:>14.0f} {chunked['extra_mb']:>10.0f} {naive['extra_mb']:>9.0f}"
                  f" {chunked['seconds']:>9.2f} {naive['seconds']:>8.2f}")
    small, large = results[positions[0], vocabs[0]], results[positions[-1], vocabs[-1]]
    print(f"BENCH logit_lens_memory vs=1k_x_32k ratio={large[0]['extra_mb'] / small[0]['extra_mb']:.2f} target=<=1.10")
    print(f"BENCH logit_lens_memory_vs_naive vs=naive_lens ratio={large[0]['extra_mb'] / large[1]['extra_mb']:.2f} target=<=0.10")
    print(f"BENCH logit_lens_time vs=naive_lens ratio={large[0]['seconds'] / large[1]['seconds']:.2f} target=<=1.25")


if __name__ == "__main__":
    main()
