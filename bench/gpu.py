"""mm_lens on a GPU at llava-v1.6-vicuna-7b shapes: neuron statistics and a patching sweep
in tokens per second against the bare HF forward (SDPA, or flash attention 2 where the
``flash_attn`` package is installed), all in one process, with a random-initialised model
(no download).

Shapes: vision tower CLIP ViT-L/14 at 336 px (24 layers x 1024, MLP 4096, 16 heads), LM
Vicuna-7B (32 layers x 4096, MLP 11008, 32 heads, vocabulary 32,000), LLaVA-NeXT anyres
(672 x 672 pictures: base view + 2 x 2 tiles = 2,928 image tokens). ``--tiny`` runs the same
script on a small model of the same architecture (to test it on a CPU first).

    python bench/gpu.py                 # on a GPU machine: bf16, about 2,900 positions per row
    python bench/gpu.py --tiny --device cpu --dtype float32

Prints one ``BENCH`` line per measurement (ratio = rival's tokens/s over mm_lens' tokens/s,
i.e. how many times slower mm_lens is).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from PIL import Image

from common import QUESTION, bench_line
from mm_lens import HookedMLLM
from mm_lens.analysis.patching import patch_sweep
from mm_lens.model.tiny.common import save_model
from mm_lens.model.tiny.llava import llava_model_and_processor
from mm_lens.neurons.statistics import NeuronStatsCollector

VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "projection_dim": 768}
TINY_TEXT = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 8, "vocab_size": 32000}
TINY_VISION = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 3, "num_attention_heads": 6,
               "projection_dim": 192}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="a small model of the same architecture (CPU test)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
parser.add_argument("--batch", type=int, default=2, help="prompts per forward")
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--patch-positions", type=int, default=64, help="image positions patched per layer in the sweep")
args = parser.parse_args()
transformers.logging.set_verbosity_error()
device, dtype = torch.device(args.device), getattr(torch, args.dtype)
image_size = 112 if args.tiny else 336

# processor and config from a small model of the same kind; the weights are made at full size on the device
small, processor = llava_model_and_processor(anyres=True, image_size=image_size, patch_size=14, width=64,
                                             vision_layers=1, text_layers=1, text_overrides={"vocab_size": 32000})
folder = save_model(small, processor, Path(tempfile.mkdtemp(prefix="mm_lens_gpu_")))
config = transformers.AutoConfig.from_pretrained(folder)
for key, value in (TINY_TEXT if args.tiny else VICUNA_7B).items():
    setattr(config.text_config, key, value)
for key, value in (TINY_VISION if args.tiny else CLIP_L_336).items():
    setattr(config.vision_config, key, value)
attention = "sdpa"
try:
    import flash_attn  # noqa: F401

    attention = "flash_attention_2" if device.type == "cuda" and dtype != torch.float32 else "sdpa"
except ImportError:
    pass


def random_model(implementation: str) -> torch.nn.Module:
    """The full-size model, random weights drawn from one seed (so both copies are equal)."""
    torch.manual_seed(0)
    config._attn_implementation = implementation
    with torch.device(device):
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, torch_dtype=dtype)
    return model.eval()


def synchronize() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(run, repeats: int) -> float:
    """Median seconds of ``run`` after one warm-up."""
    run()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


bare = random_model(attention)
hooked = HookedMLLM.from_pretrained(folder, hf_model=random_model("eager"), dtype=dtype)
rng = np.random.RandomState(0)
side = 2 * image_size  # a square picture takes the 2 x 2 grid: the most image tokens
pictures = [Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.batch + 1)]
batch = hooked.prepare_inputs([QUESTION] * args.batch, pictures[: args.batch]).to(device)
inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
tokens = int(batch["attention_mask"].sum())
print(f"{'tiny' if args.tiny else 'llava-v1.6-vicuna-7b'} shapes, {args.dtype} on {device}; rival attention: {attention}; "
      f"batch {tuple(batch['input_ids'].shape)}, {tokens} positions")

with torch.no_grad():
    reference = bare(**inputs).logits
    agreement = float((hooked(batch).to(reference.dtype) - reference).abs().max())
    print(f"largest logit difference between the bridge and the bare model: {agreement:.3g}")
    domains = ["a", "b"]
    labels = [domains[i % 2] for i in range(args.batch)]
    collector = NeuronStatsCollector(hooked, domains)
    bare_seconds = seconds(lambda: bare(**inputs), args.repeats)
    stats_seconds = seconds(lambda: collector.update(batch, labels), args.repeats)
    print(f"  bare HF forward ({attention}) {tokens / bare_seconds:12,.0f} tokens/s")
    print(f"  mm_lens statistics, all modules {tokens / stats_seconds:12,.0f} tokens/s")
    print(bench_line("gpu_statistics", stats_seconds / bare_seconds, "<=", 1.05, vs=f"hf_{attention}"))

    one = hooked.prepare_inputs([QUESTION], pictures[:1]).to(device)
    other = hooked.prepare_inputs([QUESTION], pictures[-1:]).to(device)
    image_positions = torch.nonzero(one.modality_map.mask("image")[0]).flatten()
    chosen = torch.zeros_like(one.modality_map.mask("image"))
    chosen[0, image_positions[torch.linspace(0, len(image_positions) - 1, args.patch_positions).long()]] = True
    layers = list(range(0, hooked.cfg.n_layers, max(1, hooked.cfg.n_layers // 4)))
    one_inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in one.inputs.items()}
    forward_seconds = seconds(lambda: bare(**one_inputs), args.repeats)
    start = time.perf_counter()
    result = patch_sweep(hooked, one, other, layers=layers, positions=chosen, metric="kl", progress=False)
    synchronize()
    sweep_seconds = time.perf_counter() - start
    patches = len(layers) * len(result.units)
    print(f"  patching: {patches} patches ({len(layers)} layers x {len(result.units)} image positions) in {sweep_seconds:.1f} s; "
          f"one bare forward {forward_seconds * 1000:.0f} ms")
    print(bench_line("gpu_patching", forward_seconds * patches / sweep_seconds, ">=", 2.0, vs=f"hf_{attention}_forward_per_patch"))
