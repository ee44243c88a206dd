"""The peer (TRL SFTTrainer + PEFT LoRA) on B3: a real pretrained model and pre-tokenized rows.

`../shared/bench/peer_trl.py` builds its own random 58M Llama, so B3 has this runner: the same SFTConfig
settings and variants as that script (padded + group_by_length, padding_free; bf16 and gradient checkpointing
off, completion-only loss, AdamW lr 2e-4 constant), the same clock (one timestamp per optimizer step) and the
same RESULT fields, on the model directory and the rows the harness hands it. It imports nothing from sftlab,
so its peak RSS is the peer's own.

  python -m benchmarks.peer_real --model-dir DIR --rows rows.json --variant lora-group --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ["lora-pad", "lora-group", "lora-padfree"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rows", required=True, help="JSON {input_ids: [[...]], completion_mask: [[...]]}")
    ap.add_argument("--variant", choices=VARIANTS, default="lora-group")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="/tmp/peer_real_out")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    import_s = time.perf_counter() - t_import

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n_params = sum(p.numel() for p in model.parameters())
    tied = emb.data_ptr() == head.data_ptr()
    n_flop = n_params - emb.numel() - (0 if tied else head.numel()) + head.numel()

    with open(args.rows) as f:
        rows = json.load(f)
    comp_tokens = sum(sum(m) for m in rows["completion_mask"])
    ds = datasets.Dataset.from_dict(rows)
    layout = args.variant.split("-", 1)[1]
    kw: dict = {"packing": False, "padding_free": False, "max_length": args.max_length}
    if layout == "padfree":
        kw.update(
            padding_free=True, max_length=None
        )  # TRL refuses padding_free w/o packing when max_length is set
    extra = {"train_sampling_strategy": "group_by_length"} if layout == "group" else {}
    sft_args = SFTConfig(
        output_dir=args.out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=2e-4, optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        completion_only_loss=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed, data_seed=args.seed, **kw, **extra,
    )  # fmt: skip
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                             task_type="CAUSAL_LM")  # fmt: skip
    stats: dict[str, list] = {"real": [], "loss_tok": [], "padded": [], "t_end": []}

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            if "attention_mask" in inputs:
                stats["real"].append(int(inputs["attention_mask"].sum()))
            else:  # padding-free: one flattened row, no pad
                stats["real"].append(int(inputs["input_ids"].numel()))
            stats["padded"].append(int(inputs["input_ids"].numel()))
            stats["loss_tok"].append(int((inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, *a, **k)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            stats["t_end"].append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = Counting(model=model, args=sft_args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Clock()])  # fmt: skip
    setup_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    label_tokens = sum(sum(1 for t in lab if t != -100) for lab in trainer.train_dataset["labels"])
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1

    w, n = args.warmup, args.steps
    meas_s = stats["t_end"][-1] - (stats["t_end"][w - 1] if w > 0 else t1)
    real, loss_tok, padded = (sum(stats[k][w:]) for k in ("real", "loss_tok", "padded"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    flops_per_tok = 4 * n_flop
    res = {
        "variant": args.variant, "steps": n, "warmup": w, "batch": args.batch, "threads": torch.get_num_threads(),
        "tokens_per_s": round(real / meas_s, 1), "loss_tokens_per_s": round(loss_tok / meas_s, 1),
        "s_per_step": round(meas_s / n, 3), "real_tokens": real, "loss_tokens": loss_tok, "tensor_tokens": padded,
        "pad_fraction": round(1 - real / padded, 4), "completion_tokens_in_data": comp_tokens,
        "label_tokens_in_prepared_dataset": label_tokens, "completion_only_ok": label_tokens == comp_tokens,
        "final_loss": round(losses[-1], 4) if losses else None, "first_loss": round(losses[0], 4) if losses else None,
        "params": n_params, "params_nonemb_plus_head": n_flop, "trainable_params": trainable, "tied": tied,
        "flops_per_token": flops_per_tok, "achieved_gflops": round(flops_per_tok * real / meas_s / 1e9, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "import_s": round(import_s, 2), "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "datasets": datasets.__version__},
    }  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
