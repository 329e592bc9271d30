"""Stage 1: multi-task LoRA fine-tuning with DeepSpeed ZeRO on Ray Train, fed by Ray Data."""
