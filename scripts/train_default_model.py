"""Train mm_lens' embedded model organism from scratch and ship it in the package.

A small ``LlavaForConditionalGeneration`` (CLIP-style vision tower on 32x32 images with
8-pixel patches, two-layer GELU projector, Llama-style LM) learns the synthetic five-domain
image QA of ``mm_lens.base.synthetic`` plus text-only facts, on the CPU. The script writes:

- ``mm_lens/assets/default_model/``: weights (safetensors), config, tokenizer, processor,
  and ``training_report.json`` (settings, loss curve, time, per-domain accuracy vs chance);
- ``mm_lens/assets/default_data/``: the held-out test split (``datasets.save_to_disk``).

    python scripts/train_default_model.py            # about 10-20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
import transformers
from transformers import LlavaProcessor

from mm_lens import HookedMLLM
from mm_lens.base.data import chance_accuracy
from mm_lens.base.synthetic import FEATURES, generate_samples, vocabulary
from mm_lens.analysis.evaluation import score_answers
from mm_lens.model.inputs import format_prompt
from mm_lens.model.tiny.llava import llava_model_and_processor

ASSETS = Path(__file__).resolve().parents[1] / "mm_lens" / "assets"
IMAGE_SIZE, PATCH = 32, 8


def build_untrained(seed: int):
    """The organism before training: CLIP-style tower (3 layers, width 96), Llama-style LM
    (4 layers, width 128, MLP 512), word-level tokenizer over the data's vocabulary."""
    return llava_model_and_processor(
        image_size=IMAGE_SIZE, patch_size=PATCH, width=128, vision_layers=3, text_layers=4, seed=seed,
        words=vocabulary(), vision_feature_layer=-1,
        vision_overrides={"hidden_size": 96, "projection_dim": 96, "intermediate_size": 384},
        text_overrides={"intermediate_size": 512},
    )


def encode_training_set(processor: LlavaProcessor, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt + answer + end-of-sequence, right-padded; labels only on the answer and EOS."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    texts = [
        format_prompt(processor, s["question"], 0 if s["image"] is None else 1, chat=True) + " " + s["answer"] + " </s>"
        for s in samples
    ]
    answers = [len(tokenizer(" " + s["answer"] + " </s>", add_special_tokens=False)["input_ids"]) for s in samples]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    pixel = processor.image_processor([s["image"] for s in samples if s["image"] is not None], return_tensors="pt")["pixel_values"]
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2
    ids, labels = [], []
    for row, n_answer in zip(encoded["input_ids"], answers):
        row = row.tolist()
        if image_token in row:  # expand the one <image> into one token per patch
            k = row.index(image_token)
            row = row[:k] + [image_token] * n_image_tokens + row[k + 1 :]
        length = sum(1 for t in row if t != tokenizer.pad_token_id)
        label = [-100] * len(row)
        label[length - n_answer : length] = row[length - n_answer : length]
        ids.append(row)
        labels.append(label)
    width = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "has_image": torch.tensor([s["image"] is not None for s in samples]),
        "pixel_values": pixel,
    }


def batches(data: dict[str, torch.Tensor], batch_size: int, generator: torch.Generator):
    """Endless shuffled batches; images are picked to match the rows that have them."""
    n = data["input_ids"].shape[0]
    image_index = torch.cumsum(data["has_image"].long(), 0) - 1
    while True:
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            with_image = rows[data["has_image"][rows]]
            batch = {k: data[k][rows] for k in ("input_ids", "labels", "attention_mask")}
            width = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
            if len(with_image):
                batch["pixel_values"] = data["pixel_values"][image_index[with_image]]
            yield batch


def accuracy_table(model_folder: Path, samples) -> dict[str, dict[str, float]]:
    hooked = HookedMLLM.from_pretrained(model_folder)
    scores = score_answers(hooked, samples, batch_size=64, max_new_tokens=3)
    domains = [s["domain"] for s in samples]
    chance = chance_accuracy(samples)
    table = {}
    for domain in sorted(set(domains)):
        mask = torch.tensor([d == domain for d in domains])
        table[domain] = {"accuracy": float(scores.correct[mask].double().mean()), "chance": chance[domain], "n": int(mask.sum())}
    table["all"] = {"accuracy": float(scores.correct.double().mean()), "n": len(samples)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-per-domain", type=int, default=1200)
    parser.add_argument("--test-per-domain", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)

    train = generate_samples(args.train_per_domain, seed=args.seed, image_size=IMAGE_SIZE)
    test = generate_samples(args.test_per_domain, seed=args.seed + 1000, image_size=IMAGE_SIZE)
    model, processor = build_untrained(args.seed)
    data = encode_training_set(processor, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    )
    stream = batches(data, args.batch_size, torch.Generator().manual_seed(args.seed))
    model.train()
    losses, start = [], time.time()
    for step in range(args.steps):
        loss = model(**next(stream)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.time() - start:6.0f}s", flush=True)
    train_seconds = time.time() - start
    model.eval()

    model_folder, data_folder = args.out / "default_model", args.out / "default_data"
    for folder in (model_folder, data_folder):
        shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(model_folder, safe_serialization=True)
    processor.save_pretrained(model_folder)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(test, features=FEATURES)}).save_to_disk(str(data_folder))

    table = accuracy_table(model_folder, test)
    report = {
        "settings": vars(args) | {"out": str(args.out), "image_size": IMAGE_SIZE, "patch": PATCH},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "loss_every_100_steps": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 4) for i in range(0, len(losses), 100)],
        "test_accuracy": table,
    }
    (model_folder / "training_report.json").write_text(json.dumps(report, indent=2))
    print(f"trained {report['parameters']:,} parameters in {train_seconds:.0f}s")
    for domain, row in table.items():
        print(f"  {domain:<9} accuracy {row['accuracy']:.2f}" + (f"  (chance {row['chance']:.2f})" if "chance" in row else ""))


if __name__ == "__main__":
    main()
