"""``HookedMLLM.generate`` (KV cache, every bridge hook point live) against HF's own
``generate`` on a bare copy of the same weights, with SDPA attention (what a researcher who
skips mm_lens runs) and with eager attention. Greedy, a fixed number of new tokens (no stop at
the end-of-sequence token, media tokens suppressed on both sides), at the LLaVA-1.5 shape
(576 image tokens); the generated tokens must be identical.

    python bench/generate.py [--quick] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import QUESTION, bench_line, build_model, samples, time_rivals

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and shorter answers (under a minute)")
parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 32; 8 with --quick)")
args = parser.parse_args()
new_tokens = args.new_tokens or (8 if args.quick else 32)
torch.set_num_threads(1)  # one thread: less noise from other processes on a shared machine

model, bare_sdpa, bare_eager = build_model(args.quick, "sdpa", shape=None if args.quick else "llava15", also=("eager",))
pictures = [s["image"] for s in samples(2, size=(336, 336))]
batch = model.prepare_inputs([QUESTION] * 2, pictures)
image_tokens = int(batch.modality_map.mask("image")[0].sum())
media = sorted(set(model.spec.token_ids(model.hf_model.config).values()))


def hf(bare):
    def run():
        with torch.no_grad():
            return bare.generate(**batch.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 suppress_tokens=media, pad_token_id=model.processor.tokenizer.pad_token_id)
    return run


def ours():
    return model.generate(batch, max_new_tokens=new_tokens, stop_at_eos=False).tokens


same = {name: torch.equal(ours(), run()) for name, run in {"sdpa": hf(bare_sdpa), "eager": hf(bare_eager)}.items()}
print(f"{batch['input_ids'].shape[1]} prompt positions ({image_tokens} image tokens) x 2 rows, {new_tokens} new tokens; "
      f"identical tokens: {same}")
if not all(same.values()):
    raise SystemExit("mm_lens' generate and HF's differ: the timing would compare different work")
times = time_rivals({"hf_sdpa": hf(bare_sdpa), "hf_eager": hf(bare_eager), "mm_lens": ours}, repeats=3 if args.quick else 5,
                    clock=time.process_time)
for name, seconds in times.items():
    print(f"  {name:<10} {seconds:7.3f} CPU s per call")
print(bench_line("generate", times["mm_lens"] / times["hf_sdpa"], "<=", 1.1, vs="hf_sdpa_generate", image_tokens=image_tokens))
print(bench_line("generate", times["mm_lens"] / times["hf_eager"], "<=", 1.1, vs="hf_eager_generate", image_tokens=image_tokens))
