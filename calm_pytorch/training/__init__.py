"""Training the composition weights: `FineTuner` (`finetuner.py`; one process, DDP or FSDP2 under
torchrun: `distributed.py`, `fsdp.py`; frozen models loaded shard by shard from their files:
`sharded_loading.py`), its data (`data.py`: datasets and streams; `collate.py`: rows to padded
batches), learning-rate schedule
(`schedule.py`) and resumable checkpoints (`step_checkpoints.py`); and the glue for Hugging Face's
`Trainer` and Accelerate (`hf_trainer.py`, which imports transformers). The only room above `CALM`.

May import: calm_pytorch.helpers, calm_pytorch.models, calm_pytorch.composition, calm_pytorch.checkpoints, calm_pytorch.calm
"""
