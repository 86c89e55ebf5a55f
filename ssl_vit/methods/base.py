"""What every objective shares, and nothing more: the encoder, AdamW with the objective's own
weight-decay groups, the per-step warm-up + cosine learning rate scaled by the global batch, one
EMA step per optimiser step for teachers and momentum encoders, clipping on unscaled gradients,
and logging."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ssl_vit.checkpoint import objective_name, read_checkpoint
from ssl_vit.distributed import clip_grad_norms_, gradient_shard_group
from ssl_vit.ema import ema_update
from ssl_vit.encoder import EncoderConfig, ViTEncoder
from ssl_vit.errors import UserError, last_line
from ssl_vit.export import encoder_state_dict
from ssl_vit.guards import CollapseWatch, collapse_warning_advice
from ssl_vit.health import embedding_spread, teacher_health
from ssl_vit.pictures import attention_columns, pca_columns
from ssl_vit.schedules import PaperRun, cosine_to, scaled_ema_momentum, scaled_epochs, steps_per_epoch, warmup_cosine


def adamw(module: L.LightningModule, param_groups: list[dict[str, Any]], **options: Any) -> torch.optim.AdamW:
    """AdamW at lr 0 (the schedule sets it each step), fused on a GPU, except under fp16's loss
    scaler: a fused step unscales the gradients itself, after clipping would have read them
    scaled, and Lightning refuses trainer.gradient_clip_val for it."""
    trainer = getattr(module, "_trainer", None)  # None: built outside a fit
    scaled = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
    fused = module.device.type == "cuda" and not scaled
    return torch.optim.AdamW(param_groups, lr=0.0, fused=fused, **options)


class SSLMethod(L.LightningModule):
    """Base class of the objectives. Subclasses build their heads in ``__init__`` and implement
    ``training_step(batch, batch_idx) -> loss``; a batch is ``(views, labels)``.

    Learning rate = ``base_lr * global_batch / lr_batch_divisor`` (global batch = per-device batch x devices x
    gradient-accumulation steps), linear warm-up from ``warmup_lr`` for ``warmup_epochs`` then cosine to
    ``min_lr``, set on every optimiser step from the global step, so resuming restores it exactly. With
    ``weight_decay_end`` the weight decay follows a cosine from ``weight_decay`` to it (DINO). Which
    parameters decay is the objective's official rule (:meth:`decays`).

    An objective with EMA followers (a teacher, a momentum encoder) lists them in ``ema_targets``
    and gives their momentum schedule in :meth:`ema_momentum`; the base steps them once after each
    optimiser step, however many micro-batches gradient accumulation makes of it.

    Recipes give the paper's values; with ``scale_to_run`` (the default) the quantities that only
    mean something relative to the run follow it (``docs/recipes-and-data.md``): schedule lengths
    in epochs shrink with a run shorter than the paper's (:meth:`run_epochs`) and EMA momenta keep
    the paper's averaging window in epochs (:meth:`run_momentum`). At the paper's scale both give
    the paper's numbers back.

    ``init_from`` starts the encoder from existing weights (an ``ssl-vit export`` folder, a timm
    ``local-dir`` folder, a timm ``.safetensors``/``.pth`` state dict, or an ssl-vit checkpoint, whose
    heads are then loaded too), resampling position embeddings to this encoder's grid.
    """

    #: The encoders an export or evaluation can take: role -> module path, the one the paper
    #: evaluates first (DINO lists its EMA teacher first; MoCo v3 its base encoder, as its
    #: official linear probe and conversion script keep ``base_encoder``).
    encoders: ClassVar[dict[str, str]] = {"encoder": "encoder"}
    #: Set (by the command line) when a checkpoint is to be restored over the initial weights:
    #: Lightning restores it only after ``setup``, which would otherwise read ``init_from`` first.
    restoring = False
    #: Module paths kept in eval mode (dropout, drop path, BatchNorm statistics and RoPE coordinates
    #: as in inference) whatever mode the rest is in: a distillation's frozen teacher, and the EMA
    #: teachers that the official code runs in eval mode (DINOv2's and DINOv3's).
    eval_mode_modules: ClassVar[tuple[str, ...]] = ()
    #: What the collapse warnings tell the user to check.
    collapse_advice: ClassVar[str] = "Check the learning rate, temperatures and augmentations."
    #: EMA followers: module path -> the module path it follows (DINO's teacher, MoCo v3's momentum encoder).
    ema_targets: ClassVar[dict[str, str]] = {}
    #: Encoder settings of the objective's official ViT that a recipe may override (SimMIM's layer scale).
    encoder_defaults: ClassVar[dict[str, Any]] = {}
    #: lr = base_lr x global batch / lr_batch_divisor (256 in MAE, DINO, MoCo v3; 512 in SimMIM).
    lr_batch_divisor: ClassVar[int] = 256
    #: ``linear`` (the factor above) or ``sqrt``: base_lr x sqrt(global batch / lr_batch_divisor),
    #: DINOv2's rule for AdamW, which I-JEPA (one lr at one batch, no rule of its own) follows too;
    #: ``none``: base_lr as it is, whatever the batch (open_clip's --lr, which CLIP follows).
    lr_batch_rule: ClassVar[Literal["linear", "sqrt", "none"]] = "linear"
    #: AdamW's epsilon: PyTorch's default, or the official code's (open_clip's 1e-6 for ViTs).
    adam_eps: ClassVar[float] = 1e-8
    #: SimMIM scales its warm-up start and minimum lr by the batch too; the others take them as they are.
    lr_bounds_scale_with_batch: ClassVar[bool] = False
    #: I-JEPA's schedulers step before each update, so update k uses their value at k + 1;
    #: SimMIM's after it, so update k uses k - 1 (and update 0 the start).
    schedule_step_offset: ClassVar[int] = 0
    #: The lr's rise to its peak: linear, or a half-cosine (DINOv3's high-resolution stage sets it).
    lr_warmup_shape: Literal["linear", "cosine"] = "linear"
    #: The paper's reference run, which ``scale_to_run`` scales schedule lengths and momenta from.
    paper_run: ClassVar[PaperRun]

    def __init__(
        self,
        encoder: EncoderConfig,
        *,
        base_lr: float,
        weight_decay: float,
        warmup_epochs: float,
        min_lr: float,
        betas: tuple[float, float],
        init_from: str | None = None,
        weight_decay_end: float | None = None,
        warmup_lr: float = 0.0,
        scale_to_run: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("base_lr", base_lr), ("min_lr", min_lr), ("warmup_lr", warmup_lr)):
            if value < 0:
                raise UserError(f"model.init_args.{name} is {value}; a learning rate cannot be negative")
        self.save_hyperparameters()  # the subclass's arguments, for checkpoints and exports
        self.hparams["encoder"] = {**self.encoder_defaults, **encoder}  # what checkpoints and exports rebuild
        self.encoder = self.build_encoder(self.hparams["encoder"])
        self.base_lr, self.min_lr, self.warmup_lr, self.warmup_epochs = base_lr, min_lr, warmup_lr, warmup_epochs
        self.weight_decay, self.weight_decay_end, self.betas = weight_decay, weight_decay_end, tuple(betas)
        self.init_from, self.scale_to_run = init_from, scale_to_run
        self.collapse_watch = CollapseWatch()
        self.global_batch: int | None = None  # the last step's; a resumed run's checkpoint's until its first step
        self.resumed = False
        self.checkpoint_loss: float | None = None  # the last step's loss as the resumed checkpoint saved it

    def restore_eval_modes(self) -> None:
        for path in self.eval_mode_modules:
            self.get_submodule(path).eval()

    def train(self, mode: bool = True) -> SSLMethod:
        super().train(mode)
        self.restore_eval_modes()
        return self

    def on_fit_start(self) -> None:
        if self.eval_mode_modules:  # Lightning warns of modules in eval mode: these are, as meant
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        self.restore_eval_modes()  # before Lightning records the modes it restores during the fit

    def build_encoder(self, config: dict[str, Any]) -> nn.Module:
        """The trained encoder from its recipe settings: a ViT (distillation builds any timm model)."""
        return ViTEncoder(**config)

    def ema_encoder_copy(self) -> ViTEncoder:
        """An EMA follower of the encoder (DINO's teacher, I-JEPA's target encoder): the encoder's
        architecture without stochastic depth, equal to it now, receiving no gradients."""
        follower = ViTEncoder(**{**self.hparams.encoder, "drop_path_rate": 0.0}).requires_grad_(False)
        follower.load_state_dict(self.encoder.state_dict())
        return follower

    @property
    def evaluated_encoder(self) -> ViTEncoder:
        return self.get_submodule(next(iter(self.encoders.values())))

    def setup(self, stage: str) -> None:
        # After every subclass has built and initialised its modules. A checkpoint restored over
        # them holds every weight: the starting ones, not read then, may since have moved or gone.
        if self.init_from and not self.restoring:
            self.load_initial_weights(self.init_from)

    def load_initial_weights(self, path: str) -> None:
        try:
            vit = self.encoder.vit
            missing, unexpected = vit.load_state_dict(encoder_state_dict(path, vit), strict=False)
            problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            fits = not unexpected and not [k for k in missing if not k.startswith("head.")]
        except RuntimeError as err:  # shapes differ
            problem, fits = last_line(err), False
        if not fits:
            raise UserError(
                f"model.init_from {path}: the weights do not fit the encoder ({problem}); check model.encoder"
            )
        if path.endswith(".ckpt"):  # a full ssl-vit checkpoint: the objective's heads (and teacher) too
            ckpt, own = read_checkpoint(path), self.state_dict()
            # The same objective continues from every module, its student too; another objective
            # keeps the encoder the checkpoint's paper evaluates (loaded above) as its own.
            same = objective_name(ckpt) == type(self).__name__
            state = {
                k: v
                for k, v in ckpt["state_dict"].items()
                if (same or not k.startswith("encoder.")) and k in own and own[k].shape == v.shape
            }
            self.load_state_dict(state, strict=False)
            return
        for module_path in self.encoders.values():  # a teacher / momentum encoder starts as a copy
            if module_path != "encoder":
                self.get_submodule(module_path).load_state_dict(self.encoder.state_dict())

    def on_train_start(self) -> None:
        # Lightning seeds every rank alike, so each rank would draw the same masks for its own
        # samples; the official codes seed rank r with seed + r. Runs after a resume's RNG restore.
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.randint(2**62, (1,))) + self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssl_vit"] = {
            "objective": type(self).__name__,
            "encoders": dict(self.encoders),
            "collapse": self.collapse_watch.state_dict(),
            "global_batch": self.global_batch,
            "loss": self.final_loss(),
        }

    def final_loss(self) -> float | None:
        """The last step's loss: this session's, else (a run that only did its end) its checkpoint's."""
        loss = self.trainer.callback_metrics.get("train/loss")
        return self.checkpoint_loss if loss is None else round(float(loss), 4)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.collapse_watch.load_state_dict(checkpoint.get("ssl_vit", {}).get("collapse", {}))
        saved = checkpoint.get("ssl_vit", {})
        self.global_batch, self.checkpoint_loss, self.resumed = saved.get("global_batch"), saved.get("loss"), True

    def check_global_batch(self, per_device_batch: int) -> None:
        """Say so when a run resumes at another global batch than it trained at (other devices,
        ``data.batch_size`` or accumulation): its lr and steps per epoch follow the batch, so from
        here it trains on other settings than the run it continues."""
        now = self.global_batch_size(per_device_batch)
        before, self.global_batch, self.resumed = self.global_batch, now, False
        if before is None or before == now:
            return
        peaks = [self.base_lr * self.lr_batch_scale(batch) for batch in (before, now)]
        lr = "its lr stays" if self.lr_batch_rule == "none" else "its peak lr {:.3g} -> {:.3g}".format(*peaks)
        rank_zero_warn(
            f"resuming at a global batch of {now} ({self.trainer.world_size} devices x {per_device_batch} x "
            f"{self.trainer.accumulate_grad_batches} accumulated) where the run trained at {before} until step "
            f"{self.global_step}: {lr}, and its steps per epoch change with it; to continue the run as it began, "
            "resume with the trainer.devices, data.batch_size and trainer.accumulate_grad_batches it began with"
        )

    def resume_problem(self, checkpoint: dict[str, Any]) -> str | None:
        """Why this objective cannot continue ``checkpoint`` beyond what every run compares
        (objective, encoder, data): the command line asks before anything is written. None: it can."""
        return None

    def global_batch_size(self, per_device_batch: int) -> int:
        return per_device_batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.trainer)

    def run_epochs(self, paper_epochs: float) -> float:
        """A schedule length the recipe gives in the paper's epochs, for this run: shrunk in
        proportion when the run is shorter than the paper's (``scale_to_run``)."""
        if not self.scale_to_run:
            return paper_epochs
        length = self.trainer.estimated_stepping_batches / self.steps_per_epoch()
        return scaled_epochs(paper_epochs, length, self.paper_run)

    def run_momentum(self, paper_momentum: float) -> float:
        """An EMA momentum the recipe gives at the paper's batch and dataset, for this run's steps
        per epoch and length (``scale_to_run``; see :func:`~ssl_vit.schedules.scaled_ema_momentum`)."""
        if not self.scale_to_run:
            return paper_momentum
        total = int(self.trainer.estimated_stepping_batches)
        return scaled_ema_momentum(paper_momentum, self.steps_per_epoch(), total, self.paper_run)

    def lr_batch_scale(self, global_batch: int) -> float:
        """The peak lr's factor for the global batch, by ``lr_batch_rule``."""
        ratio = global_batch / self.lr_batch_divisor
        if self.lr_batch_rule == "none":  # open_clip: base_lr is the lr at any batch
            return 1.0
        return math.sqrt(ratio) if self.lr_batch_rule == "sqrt" else ratio

    def warmup_steps(self) -> int:
        return round(self.run_epochs(self.warmup_epochs) * self.steps_per_epoch())

    def learning_rate(self, step: int, per_device_batch: int) -> float:
        scale = self.lr_batch_scale(self.global_batch_size(per_device_batch))
        bounds_scale = scale if self.lr_bounds_scale_with_batch else 1.0
        return warmup_cosine(
            step,
            total_steps=int(self.trainer.estimated_stepping_batches),
            warmup_steps=self.warmup_steps(),
            peak=self.base_lr * scale,
            final=self.min_lr * bounds_scale,
            start=self.warmup_lr * bounds_scale,
            warmup_shape=self.lr_warmup_shape,
        )

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """Whether weight decay applies to a parameter: the official code's rule. By default
        biases and 1-D parameters (norms, layer scales) do not decay, as in MAE's and DINO's code;
        tokens and position embeddings do. Objectives with another rule override this."""
        return param.ndim > 1 and not name.endswith(".bias")

    def lr_scale(self, name: str, param: nn.Parameter) -> float:
        """A parameter's multiplier of the scheduled lr (DINOv2's layer-wise decay); 1 by default."""
        return 1.0

    def lr_group(self, name: str, param: nn.Parameter) -> str:
        """A name that puts a parameter in optimiser groups of its own (their ``lr_group``), whose
        lr an objective can set apart after :meth:`on_train_batch_start` (DINOv2's last layers)."""
        return ""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups: dict[tuple[bool, float, str], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                key = (self.decays(name, param), self.lr_scale(name, param), self.lr_group(name, param))
                groups.setdefault(key, []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.weight_decay if decays else 0.0,
                "lr_scale": scale,
                "lr_group": lr_group,
            }
            for (decays, scale, lr_group), params in sorted(
                groups.items(), key=lambda item: (not item[0][0], -item[0][1], item[0][2])
            )
        ]
        return adamw(self, param_groups, betas=self.betas, eps=self.adam_eps)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clip_objective_gradients()

    def clip_objective_gradients(self) -> None:
        """The official code's own gradient clipping at ``clip_grad`` (none without it), on unscaled
        gradients: each of ``gradient_clip_groups`` clipped to that norm on its own. Under FSDP the
        norms are the whole gradients', summed over the shards. ``trainer.gradient_clip_val`` clips
        besides."""
        if self.hparams.get("clip_grad"):
            clip_grad_norms_(self.gradient_clip_groups(), self.hparams.clip_grad, gradient_shard_group(self._trainer))

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter groups whose gradient norms are clipped each on its own: all together
        (SimMIM's global norm) unless an objective says otherwise (DINO: each parameter; DINOv2:
        each module)."""
        return [[*self.parameters()]]

    def ema_momentum(self, step: int) -> float:
        """The EMA followers' momentum after optimiser step ``step`` (0-based)."""
        raise NotImplementedError(f"{type(self).__name__} lists ema_targets but has no ema_momentum")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self.global_step  # the step this call takes
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        """Once after each optimiser step (not each micro-batch): the EMA followers follow.
        Objectives with other per-step state (DINO's centre) extend this."""
        if self.ema_targets:
            momentum = self.ema_momentum(step)
            for target, source in self.ema_targets.items():
                ema_update(self.get_submodule(target), self.get_submodule(source), momentum)
            self.log("train/ema_momentum", momentum)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        _, labels = batch
        if self.resumed or self.global_batch is None:
            self.check_global_batch(len(labels))
        step = self.schedule_step()
        lr = self.learning_rate(step, per_device_batch=len(labels))
        wd = self.weight_decay
        if self.weight_decay_end is not None:
            wd = cosine_to(step, int(self.trainer.estimated_stepping_batches), wd, self.weight_decay_end)
            self.log("train/weight_decay", wd)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group["weight_decay"]:  # only the decayed groups follow the schedule
                group["weight_decay"] = wd
        self.log("train/lr", lr, prog_bar=True)

    def schedule_step(self) -> int:
        """The step of the lr and weight-decay schedules that this optimiser step takes."""
        return max(0, self.global_step + self.schedule_step_offset)

    def pictures(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Named picture grids of what the objective does to ``images`` (normalised, (B, 3, H, W)),
        each a list of columns of displayable images; drawn by :class:`~ssl_vit.pictures.PicturesCallback`.
        Every objective shows its evaluated encoder's last-block attention (DINO's maps) and the
        first three principal components of its patch features as colours (DINOv2's picture)."""
        encoder = self.evaluated_encoder
        return {"attention": attention_columns(encoder, images), "patch_pca": pca_columns(encoder, images)}

    def teacher_probs(self, images: Tensor) -> Tensor | None:
        """A teacher-student objective's (B, K) target distributions for ``images`` as its teacher
        sees them now (for the health metrics); None for objectives without a teacher."""
        return None

    def watch_collapse(self, embeddings: Tensor, teacher_probs: Tensor | None = None) -> None:
        """Log the per-dimension std of L2-normalised embeddings, scaled by sqrt(dim) (about 1
        for well-spread embeddings, 0 when all are identical), and warn while the run is
        collapsed: at the onset and again every tenth of the run, with the steps spent collapsed
        so far (the end-of-run summary has the total). Checked at the first step, and then on the
        steps whose logs Lightning writes only (after every ``log_every_n_steps``-th): it waits
        for the device, and a value logged on another step would reach the logs late, or, in an
        epoch shorter than the interval, never.

        A teacher-student objective also passes its teacher's target distributions, (B, K): their
        mean entropy is logged as a fraction of ln K, with the fraction of the K outputs that are
        some image's most likely one (``train/prototypes_used``), and a teacher that spreads each
        image over more than half of the K outputs (entropy above ln K - ln 2) is collapsed to
        uniform, whatever the spread says: the spread is scale-free, and a teacher whose outputs
        shrink towards equal logits keeps its spread while its softmax goes flat."""
        trainer = self._trainer
        every = max(1, trainer.log_every_n_steps) if trainer is not None else 1
        if self.global_step and (self.global_step + 1) % every:
            return
        spread = embedding_spread(embeddings)
        self.log("train/embedding_spread", spread)
        uniform = False
        if teacher_probs is not None:
            entropy, used = teacher_health(teacher_probs)
            self.log("train/teacher_entropy", entropy)
            self.log("train/prototypes_used", used)
            uniform = entropy > 1 - math.log(2) / math.log(teacher_probs.shape[1])
        watch = self.collapse_watch
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 1
        step = self.global_step
        if watch.update(step, collapsed=spread < watch.threshold or uniform, repeat_every=max(every, total // 10)):
            init_from = self.hparams.get("init_from")
            advice = collapse_warning_advice(step, watch.since, total, uniform, init_from, self.collapse_advice)
            rank_zero_warn(watch.warning(type(self).__name__, step, spread, uniform, advice))
        self.log("train/collapsed_steps", float(watch.collapsed_steps))
