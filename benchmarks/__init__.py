"""Side-by-side benchmarks of sftlab against its peer (TRL SFTTrainer + PEFT). Run `python -m benchmarks.sft`."""
