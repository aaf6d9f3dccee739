"""Train the tiny VLM's projector on the easy-vqa train split, both towers frozen (seeded, CPU-friendly).

    python -m mqc.models.train_projector --stop-at-step 435     # reproduces models/tiny_vlm/projector.npz

The committed projector came from the defaults (500-step schedule, 12 images x up to 5 questions a step, peak lr
1.5e-3, seed 0) run with ``--threads 1 --max-minutes 60``, which stopped it at step 435; ``--stop-at-step 435``
makes the same cut without the clock (thread count changes only float rounding). See tiny_vlm/MODEL_CARD.md.

What makes it affordable on two CPU cores:

1. DINOv2 features are cached once (``mqc.models.features``): the projector reads [17, 384] per image.
2. The prompt's constant prefix (system prompt and the user turn's opening, 13 tokens) is run once; its KV cache is
   broadcast over the batch.
3. Shared-image packing: a row holds one image's 17 tokens followed by up to k of its questions (with answers),
   each question block masked to see only the prefix, the image and itself, all blocks at the same positions.
   Exactly equivalent to separate prompts, but the image tokens are run once per k questions.
4. Logits are computed only where a target token is predicted (the answer and ``<|im_end|>``), not over the
   49,152-word vocabulary at every position.
5. fp32 (bf16 autocast was slower on this CPU, which has no AMX).

Held-out images: train images with ``image_id % 20 == 0`` (200 images) are never trained on; their questions
measure progress (answer tokens all argmax-correct under teacher forcing, which is what greedy decoding yields).
The test split is never read here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from mqc.models import assemble
from mqc.models.data import vqa_split
from mqc.models.features import compute_features
from mqc.models.prompting import build_prompt, encode_text

logger = logging.getLogger("train_projector")

HOLDOUT_MOD = 20


class Packer:
    """Tokenized questions grouped by image, packed ``image + k question blocks`` per row.

    Every question block attends to the cached prefix, the image tokens and itself (causally), never to the other
    blocks, and all blocks start at the same position: the logits equal those of separate single-question
    prompts, while the image tokens are run once for k questions.
    """

    def __init__(self, tokenizer, manifest: dict, items, im_end: int):
        first = build_prompt(tokenizer, manifest, items[0].question)
        self.n_image = int(manifest["num_image_tokens"])
        self.prefix_len = int(first.image_positions[0])
        self.prefix = first.ids[: self.prefix_len]
        self.image_token_id = int(manifest["image_token_id"])
        self.blocks: dict[int, list[tuple[np.ndarray, int]]] = {}
        for it in items:
            p = build_prompt(tokenizer, manifest, it.question)
            if not np.array_equal(p.ids[: self.prefix_len], self.prefix):
                raise ValueError("prompt prefix is not constant")
            tail = p.ids[self.prefix_len + self.n_image :]
            ans = np.asarray([*encode_text(tokenizer, it.answer), im_end], np.int64)
            self.blocks.setdefault(it.image_id, []).append((np.concatenate([tail, ans]), len(tail)))

    def epoch_groups(self, rng, k: int) -> list[tuple[int, list[int]]]:
        """Each image's questions, shuffled and cut into groups of at most ``k``; groups shuffled."""
        groups = []
        for image_id, qs in self.blocks.items():
            order = rng.permutation(len(qs))
            groups += [(image_id, [int(i) for i in order[j : j + k]]) for j in range(0, len(order), k)]
        return [groups[i] for i in rng.permutation(len(groups))]

    def batch(self, groups, feats):
        import torch

        rows = []
        for image_id, qidx in groups:
            blocks = [self.blocks[image_id][i] for i in qidx]
            rows.append((image_id, blocks))
        n_img, p = self.n_image, self.prefix_len
        s = max(n_img + sum(len(b[0]) for b in blocks) for _, blocks in rows)
        b = len(rows)
        ids = np.full((b, s), self.image_token_id, np.int64)
        pos = np.zeros((b, s), np.int64)
        allow = np.zeros((b, s, p + s), bool)
        allow[:, :, :p] = True
        tgt_rows, tgt_pos, tgt_ids, q_of, last_of = [], [], [], [], []
        n_questions = 0
        for r, (_, blocks) in enumerate(rows):
            pos[r, :n_img] = np.arange(p, p + n_img)
            allow[r, :n_img, p : p + n_img] = np.tril(np.ones((n_img, n_img), bool))
            start = n_img
            for seq, n_prompt in blocks:
                n = len(seq)
                ids[r, start : start + n] = seq
                pos[r, start : start + n] = np.arange(p + n_img, p + n_img + n)
                allow[r, start : start + n, p : p + n_img] = True
                allow[r, start : start + n, p + start : p + start + n] = np.tril(np.ones((n, n), bool))
                for j in range(n_prompt, n):
                    tgt_rows.append(r)
                    tgt_pos.append(start + j - 1)
                    tgt_ids.append(seq[j])
                    q_of.append(n_questions)
                    last_of.append(j == n - 1)
                n_questions += 1
                start += n
        mask = np.where(allow, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
        img = torch.from_numpy(feats[[image_id for image_id, _ in rows]])
        return {"ids": torch.from_numpy(ids), "pos": torch.from_numpy(pos), "mask": torch.from_numpy(mask),
                "img": img, "rows": torch.tensor(tgt_rows), "tpos": torch.tensor(tgt_pos),
                "tgt": torch.tensor(tgt_ids), "q_of": np.asarray(q_of), "is_eos": np.asarray(last_of),
                "n_questions": n_questions}


def _prefix_cache(model, prefix_ids):
    import torch

    with torch.no_grad():
        out = model.model(input_ids=torch.from_numpy(prefix_ids)[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def _forward(model, projector, prefix_kv, batch, n_image: int, bf16: bool = False):
    """Logits at the target positions: [num_targets, vocab]."""
    import torch
    from transformers.cache_utils import DynamicCache

    ids = batch["ids"]
    b = ids.shape[0]
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
    emb = model.model.embed_tokens(ids)
    vis = projector(batch["img"])
    emb = torch.cat([vis.to(emb.dtype), emb[:, n_image:]], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["pos"],
                             past_key_values=cache, use_cache=True).last_hidden_state
        logits = model.lm_head(hidden[batch["rows"], batch["tpos"]])
    return logits.float()


def evaluate_holdout(model, projector, prefix_kv, packer, groups, feats, bf16=False, batch_size=8):
    """Share of held-out questions whose answer tokens are all argmax-correct under teacher forcing."""
    import torch

    correct, total = 0, 0
    with torch.no_grad():
        for k in range(0, len(groups), batch_size):
            bt = packer.batch(groups[k : k + batch_size], feats)
            logits = _forward(model, projector, prefix_kv, bt, packer.n_image, bf16)
            ok = (logits.argmax(-1) == bt["tgt"]).numpy() | bt["is_eos"]  # answer tokens only
            per_q = np.ones(bt["n_questions"], bool)
            np.logical_and.at(per_q, bt["q_of"], ok)
            correct += int(per_q.sum())
            total += bt["n_questions"]
    return correct / max(total, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--images", type=int, default=12, help="images (packed rows) per step")
    ap.add_argument("--questions-per-image", type=int, default=5, help="question blocks packed per row")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 on CPUs without AMX)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--holdout-images", type=int, default=60)
    ap.add_argument("--out", type=Path, default=assemble.PROJECTOR_FILE)
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--init", type=Path, default=None, help="start from these projector weights (a continuation)")
    ap.add_argument("--stop-at-step", type=int, default=None,
                    help="stop after this many steps of the --steps schedule (reproduces a run cut by --max-minutes)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()

    feats = np.load(compute_features("train"))
    model, hf_tok = assemble.load_smollm2()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = hf_tok.backend_tokenizer
    cfg = {"prompt": assemble.tiny_vlm_prompt(hf_tok), **assemble.tiny_vlm_manifest_fields(hf_tok)}
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")

    items = vqa_split("train")
    train_items = [it for it in items if it.image_id % HOLDOUT_MOD != 0]
    held_items = [it for it in items if it.image_id % HOLDOUT_MOD == 0]
    packer = Packer(tok, cfg, train_items, im_end)
    held = Packer(tok, cfg, held_items, im_end)
    held_groups = held.epoch_groups(np.random.default_rng(args.seed + 1), 10)[: args.holdout_images]
    logger.info("train questions %d (images %d); held-out %d questions on %d images; prefix %d tokens",
                len(train_items), len(packer.blocks), sum(len(q) for _, q in held_groups), len(held_groups),
                packer.prefix_len)
    prefix_kv = _prefix_cache(model, packer.prefix)

    projector = assemble.load_projector(args.init).train() if args.init else assemble.new_projector()
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    groups = packer.epoch_groups(rng, args.questions_per_image)
    cursor = 0
    epochs = 0
    history = []
    ema = None
    step = 0
    seen = 0
    for step in range(args.steps):
        if cursor + args.images > len(groups):
            groups = packer.epoch_groups(rng, args.questions_per_image)
            cursor = 0
            epochs += 1
        chunk = groups[cursor : cursor + args.images]
        cursor += args.images
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        bt = packer.batch(chunk, feats)
        seen += bt["n_questions"]
        t = time.perf_counter()
        logits = _forward(model, projector, prefix_kv, bt, packer.n_image, args.bf16)
        loss = torch.nn.functional.cross_entropy(logits, bt["tgt"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 5 == 0:
            logger.info("step %d loss %.4f (ema %.4f) lr %.2e, %d questions, %.1f s/step, %.1f min", step,
                        loss.item(), ema, lr_at(step), seen, time.perf_counter() - t,
                        (time.perf_counter() - t_start) / 60)
        last = step == args.steps - 1
        out_of_time = bool(args.max_minutes and (time.perf_counter() - t_start) / 60 > args.max_minutes)
        out_of_time = out_of_time or bool(args.stop_at_step and step + 1 >= args.stop_at_step)
        if (step + 1) % args.eval_every == 0 or last or out_of_time:
            acc = evaluate_holdout(model, projector, prefix_kv, held, held_groups, feats, args.bf16)
            history.append({"step": step + 1, "questions_seen": seen, "holdout_acc": round(acc, 4),
                            "loss_ema": round(ema, 4), "minutes": round((time.perf_counter() - t_start) / 60, 1)})
            logger.info("step %d held-out accuracy %.3f", step + 1, acc)
            if args.checkpoint_dir:
                args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                assemble.save_projector(projector, args.checkpoint_dir / f"projector_step{step + 1}.npz")
        if out_of_time:
            logger.info("stopping at the time limit")
            break

    minutes = (time.perf_counter() - t_start) / 60
    meta = {"seed": args.seed, "steps": step + 1, "schedule_steps": args.steps,
            "stopped_early": bool(out_of_time), "init": str(args.init) if args.init else None, "images_per_step": args.images,
            "questions_per_image": args.questions_per_image, "lr": args.lr, "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay, "bf16_autocast": args.bf16,
            "threads": args.threads, "train_questions": len(train_items), "holdout_images_mod": HOLDOUT_MOD,
            "questions_seen": seen, "epochs_completed": epochs, "wall_minutes": round(minutes, 1),
            "history": history}
    assemble.save_projector(projector, args.out, meta)
    (args.out.with_suffix(".json")).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("saved %s after %.1f min", args.out, minutes)


if __name__ == "__main__":
    main()
