"""Hugging Face Trainer runs for ``test_hf_trainer.py``, one per process.

    python tests/hf_trainer_jobs.py JOB OUT_DIR [CHECKPOINT]

writes ``OUT_DIR/result.json`` (per-step losses and gradient norms as
Trainer logged them, and what the job measured) and, where the job saves, the
files Trainer writes. Each job is a process of its own: accelerate keeps
state per process (per thread under torch_xla) and ``patch_torch_xla()``
changes the process.

The models are tiny GPT-2 and ViT configurations built from their configs
(no download), without dropout, on random data; every run takes the same
global batches: ``GLOBAL_BATCH`` samples per step, split over the devices in
rank order. The data is read in order (``train_sampling_strategy="sequential"``):
the device threads share torch's global RNG (``shared/PLATFORM.md``), so a
random sampler's seed would depend on the threads' timing. The initial weights
are built once, in the main thread, and copied to every rank.

Jobs:

* ``reference``: GPT-2 and ViT unsharded (no FSDP) on one device: the numbers
  every sharded run must reproduce. ``optim="adamw_torch"``: the default fused
  AdamW refuses XLA tensors with or without FSDP. The two Trainers share this
  process, nothing patched, each in device threads of its own (accelerate
  keeps its state per thread under torch_xla).
* ``gpt2_sharded``: GPT-2 on 2 devices through ``xla_fsdp.patch_torch_xla()``
  and an unmodified ``Trainer`` with default optimiser settings; checkpoints
  every 2 steps, then ``save_model()``, then the wrapped model's loss on a fixed
  batch, and the same loss from ``from_pretrained`` of the saved directory on
  the host.
* ``gpt2_resume CHECKPOINT``: a new Trainer resumes ``gpt2_sharded``'s step-2
  checkpoint on 2 devices and trains to the same step.
* ``vit_sharded``: ViT on 4 devices with ``xla_fsdp_grad_ckpt`` (each block
  under ``checkpoint_module``).
* ``vit_launch``: ViT on one device under ``torch_xla.launch``, first with
  torch_xla's own FSDP (and the README's workarounds for it), then with
  xla_fsdp through the switch, turned on in the worker process before
  transformers is imported; each in a worker process of its own.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

GLOBAL_BATCH = 4
STEPS = 4
SEQ_LEN, VOCAB = 8, 64
IMAGE, CHANNELS, LABELS = 8, 3, 3
EVAL_SAMPLES = 4


def gpt2_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def vit_model():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMAGE, patch_size=4, num_channels=CHANNELS, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=LABELS, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return ViTForImageClassification(config)


class Samples:
    """A map-style dataset of seeded random samples (a list of dicts, as Trainer's collator expects)."""

    def __init__(self, model_kind: str, count: int = GLOBAL_BATCH * STEPS):
        import torch

        generator = torch.Generator().manual_seed(1)
        if model_kind == "gpt2":
            tokens = torch.randint(0, VOCAB, (count, SEQ_LEN), generator=generator)
            self.items = [{"input_ids": t, "labels": t} for t in tokens]
        else:
            images = torch.randn(count, CHANNELS, IMAGE, IMAGE, generator=generator)
            labels = torch.randint(0, LABELS, (count,), generator=generator)
            self.items = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def batch(self, count: int = EVAL_SAMPLES) -> dict:
        import torch
        return {k: torch.stack([item[k] for item in self.items[:count]]) for k in self.items[0]}


def training_args(out_dir: Path, world: int, fsdp: dict | None, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
                    learning_rate=1e-3, weight_decay=0.01, warmup_steps=1, logging_steps=1, save_strategy="no",
                    report_to="none", disable_tqdm=True, train_sampling_strategy="sequential")
    if fsdp is not None:
        settings.update(fsdp=True, fsdp_config={"xla": True, **fsdp})
    settings.update(overrides)
    return TrainingArguments(**settings)


def logged(trainer) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"steps": [h["step"] for h in history], "losses": [h["loss"] for h in history],
            "grad_norms": [h["grad_norm"] for h in history]}


def loss_on(model, batch: dict, device) -> float:
    import torch
    import torch_xla

    model.eval()
    with torch.no_grad():
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    torch_xla.sync()
    return loss.item()


def write(out_dir: Path, result: dict) -> None:
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))


def reload(model_cls, saved: Path, data: "Samples") -> float:
    """``from_pretrained(saved)`` on the host: writes its state dict to ``saved/reloaded.pt``; returns its loss."""
    import torch

    model = model_cls.from_pretrained(saved)
    model.eval()
    torch.save(model.state_dict(), saved / "reloaded.pt")
    with torch.no_grad():
        return model(**data.batch()).loss.item()


# ----------------------------------------------------------------------------- jobs on CPU device threads

def reference(out_dir: Path) -> None:
    from transformers import Trainer

    from xla_fsdp.testing import run_on_cpu_devices

    result = {}
    for kind, build in (("gpt2", gpt2_model), ("vit", vit_model)):
        model = build()

        def train(rank):
            trainer = Trainer(model=model, args=training_args(out_dir / kind, 1, None, optim="adamw_torch"),
                              train_dataset=Samples(kind))
            trainer.train()
            trainer.save_model()
            return logged(trainer)

        result[kind] = run_on_cpu_devices(train, 1)[0]
        reload(type(model), out_dir / kind, Samples(kind))
    write(out_dir, result)


def sharded(out_dir: Path, kind: str, world: int, fsdp: dict, checkpoint: str | None = None, **overrides) -> None:
    import torch_xla
    from transformers import Trainer

    import xla_fsdp
    from xla_fsdp.testing import run_on_cpu_devices

    xla_fsdp.patch_torch_xla()
    initial = gpt2_model() if kind == "gpt2" else vit_model()
    data = Samples(kind)

    def train(rank):
        trainer = Trainer(model=copy.deepcopy(initial), args=training_args(out_dir, world, fsdp, **overrides),
                          train_dataset=data)
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(str(out_dir / "final"))
        return {**logged(trainer), "wrapped_loss": loss_on(trainer.model, data.batch(), torch_xla.device()),
                "optimizer": type(trainer.optimizer.optimizer).__name__,
                "fused": trainer.optimizer.optimizer.defaults.get("fused"),
                "module_is_user_model": trainer.model.module.module.__class__.__name__}

    ranks = run_on_cpu_devices(train, world)
    result = ranks[0]
    result["wrapped_losses_by_rank"] = [r["wrapped_loss"] for r in ranks]
    result["reloaded_loss"] = reload(type(initial), out_dir / "final", data)
    write(out_dir, result)


# ----------------------------------------------------------------------------- jobs under torch_xla.launch

def _launch_worker(index: int, out_dir: str, implementation: str) -> None:
    """One torch_xla.launch worker: a process of its own, which must turn the switch on itself."""
    assert "transformers" not in sys.modules
    if implementation == "xla_fsdp":
        import xla_fsdp
        xla_fsdp.patch_torch_xla()  # before transformers is imported: the Trainer patch waits for it
    else:
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # the README's workaround for torch_xla's FSDP
    import torch_xla
    from transformers import Trainer

    class WorkaroundTrainer(Trainer):
        """The README's user-side workaround for torch_xla's own FSDP under Trainer."""

        def _wrap_model(self, model, training=True, dataloader=None):
            wrapped = super()._wrap_model(model, training, dataloader)
            if training and wrapped is not model and self.optimizer is None:
                self.create_optimizer(wrapped)
                self.accelerator._models.append(wrapped)
            return wrapped

    out = Path(out_dir) / implementation
    if implementation == "torch_xla":
        trainer_cls, overrides = WorkaroundTrainer, {"optim": "adamw_torch"}
    else:
        trainer_cls, overrides = Trainer, {}
    data = Samples("vit")
    trainer = trainer_cls(model=vit_model(), args=training_args(out, 1, {}, **overrides), train_dataset=data)
    trainer.train()
    trainer.save_model(str(out / "final"))
    fsdp_class = type(trainer.model)
    write(out, {**logged(trainer), "fsdp_class": f"{fsdp_class.__module__}.{fsdp_class.__name__}",
                "wrapped_loss": loss_on(trainer.model, data.batch(), torch_xla.device()),
                "reloaded_loss": reload(type(trainer.model.module.module), out / "final", data)})


def launch(out_dir: Path) -> None:
    """torch_xla's FSDP, then xla_fsdp, each in the worker process torch_xla.launch starts."""
    import torch_xla
    implementations = ("torch_xla", "xla_fsdp")
    for implementation in implementations:
        torch_xla.launch(_launch_worker, args=(str(out_dir), implementation))
    write(out_dir, {name: json.loads((out_dir / name / "result.json").read_text()) for name in implementations})


JOBS = {
    "reference": reference,
    "gpt2_sharded": lambda out: sharded(out, "gpt2", 2, {}, save_strategy="steps", save_steps=2),
    "gpt2_resume": lambda out, checkpoint: sharded(out, "gpt2", 2, {}, checkpoint),
    "vit_sharded": lambda out: sharded(out, "vit", 4, {"xla_fsdp_grad_ckpt": True}),
    "vit_launch": launch,
}

if __name__ == "__main__":
    job, out_dir, *rest = sys.argv[1:]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    JOBS[job](Path(out_dir), *rest)
