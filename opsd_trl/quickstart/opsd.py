"""Visual-OPSD (or the noise-VT control) on the warm-started quickstart policy, with `VisualOPSDTrainer`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from .. import VisualOPSDConfig, VisualOPSDTrainer
from ..eval import Contexts, evaluate, vision_token_ids
from ..models.adapters import get_adapter
from ..vt_cache import VisionEncoder, VTCache, build_vt_cache
from .model import TEACHER_INTRO, TEACHER_TRANSITION


def freeze_vision(model) -> None:
    """The vision tower stays at its warm-start weights, so cached VT features stay exact during training."""
    get_adapter(model).freeze_vision(model)


def vt_cache(model, processor, dataset, path: Path, progress: bool = True) -> VTCache:
    """Encode the training VTs once (resumable); the trainer checks the cache against the policy it trains."""
    freeze_vision(model)
    build_vt_cache(dataset, VisionEncoder(model, processor), path, dtype=torch.float32, batch_size=64,
                   progress=progress, source="quickstart maze train")
    return VTCache(path)


class ValidationCurve(TrainerCallback):
    """Student accuracy and KL against the fixed reference teacher on the validation split, every `every` steps."""

    def __init__(self, processor, dataset, reference, every: int):
        self.processor, self.dataset, self.reference, self.every = processor, dataset, reference, every
        self.contexts = Contexts(processor, intro=TEACHER_INTRO, transition=TEACHER_TRANSITION)
        self.points: list[dict] = []

    def record(self, model, step: int) -> None:
        metrics = evaluate(model, self.processor, self.dataset, reference=self.reference, contexts=self.contexts,
                           progress=False)
        predictions = metrics.pop("predictions")
        # per-maze outcomes, in validation order: paired tests between methods (`levers.py`)
        self.points.append({"step": step, **metrics, "correct": [p["correct"] for p in predictions]})
        model.train()

    def maybe_record(self, model, step: int, last: int) -> None:
        if step % self.every == 0 or step == last:
            self.record(model, step)

    def postfix(self) -> dict:
        p = self.points[-1]
        return {"val_acc": f"{100 * p['accuracy']:.1f}%", "val_kl": f"{p['kl_teacher_student']:.3f}"}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.maybe_record(model, state.global_step, state.max_steps)


class StageBar(TrainerCallback):
    """One progress bar for a training stage: the step, the training loss and the latest validation point. The full
    metrics go to the trainer's log history (history.json) and to tensorboard, not to the console."""

    def __init__(self, desc: str, curve: ValidationCurve, enabled: bool):
        self.desc, self.curve, self.enabled, self.bar, self.loss = desc, curve, enabled, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, disable=not self.enabled)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        loss = {} if self.loss is None else {"loss": f"{self.loss:.4f}"}
        self.bar.set_postfix({**loss, **self.curve.postfix()}, refresh=False)
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_opsd(model, processor, train, validation, reference, out: Path, *, cache: VTCache | None,
               noise_vt: bool, steps: int, teacher_mode: str, lr: float, batch_size: int, ema_decay: float,
               eval_every: int, beta: float = 0.5, jsd_clip: float | None = 0.05, seed: int = 0,
               temperature: float = 1.0, progress: bool = True, desc: str = "Visual-OPSD",
               noise_vt_count: int | None = None) -> dict:
    """Train in place; returns {"log": trainer log history, "validation": curve points}. The console shows one
    progress bar; the full logs go to `out/history.json` and `out/runs/` (tensorboard, when installed)."""
    freeze_vision(model)
    args = VisualOPSDConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), adam_beta2=0.95, max_grad_norm=1.0,
        teacher_mode=teacher_mode, noise_vt=noise_vt, beta=beta, teacher_top_k=None,
        **({"noise_vt_count": noise_vt_count} if noise_vt_count is not None else {}),
        **({"ema_decay": ema_decay} if teacher_mode == "ema" else {}),  # other modes have no decay (no warning)
        jsd_clip=jsd_clip, temperature=temperature, max_completion_length=16, max_image_skips=0,
        teacher_intro=TEACHER_INTRO, teacher_transition=TEACHER_TRANSITION,
        vt_source="online" if cache is None else "cache",
        vt_cache_dir=None if cache is None else str(cache.path),
        bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=5, seed=seed,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else [],  # under out/runs/
        disable_tqdm=True, dataloader_pin_memory=False,
        generation_kwargs={"suppress_tokens": vision_token_ids(processor)},
    )
    curve = ValidationCurve(processor, validation, reference, eval_every)
    curve.record(model, 0)
    trainer = VisualOPSDTrainer(model=model, args=args, train_dataset=train, processing_class=processor,
                                vt_cache=cache, callbacks=[curve, StageBar(desc, curve, progress)])
    trainer.remove_callback(PrinterCallback)  # the metrics dict every few steps: history.json has it
    trainer.train()
    model.eval()
    history = {"log": trainer.state.log_history, "validation": curve.points}
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return history
