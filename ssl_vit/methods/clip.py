"""CLIP (Radford et al., 2021) as open_clip trains it (``src/open_clip/model.py``, ``loss.py``,
``src/open_clip_train/train.py``, ``params.py``): the shared timm ViT as the image tower,
open_clip's text transformer as the text tower, both projected to one width and L2-normalised,
and a symmetric cross-entropy over the image-text pairs of the global batch at a learned
temperature.

A batch is ``(images, tokens)``: the images and their captions as open_clip's BPE token ids,
``(B, context_length)`` (``open_clip.tokenizer.SimpleTokenizer``, whose vocabulary ships inside
the ``open-clip-torch`` wheel: nothing is downloaded).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.checkpoint import RUN_KEY, data_settings, objective_name, read_checkpoint, run_checkpoint
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.encoder import EncoderConfig
from ssl_vit.errors import UserError
from ssl_vit.export import card, provenance, run_evaluation
from ssl_vit.losses import clip_loss
from ssl_vit.methods.base import SSLMethod
from ssl_vit.replace import OutputKind, check_replaceable, replace_output
from ssl_vit.schedules import PaperRun

try:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import TextTransformer
except ImportError as err:  # the `clip` extra
    raise UserError(f"CLIP's text tower is open_clip's ({err}): pip install 'ssl-vit[clip]'") from err

#: open_clip's ViT-B/32 on LAION-400M: 32 epochs at a global batch of 32,768.
LAION_STEPS_PER_EPOCH = 400_000_000 // 32_768


class CaptionTokens:
    """A caption -> its ``context_length`` token ids as open_clip tokenises it (``SimpleTokenizer``:
    cleaned, lower-cased BPE between start- and end-of-text tokens, zero-padded; a longer caption
    is cut so that the end-of-text token stays last), and whether it was cut. Plain and
    picklable: the loader workers run it (``ShardDataset``'s ``captions``)."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length

    def __call__(self, caption: str) -> tuple[Tensor, bool]:
        # SimpleTokenizer.__call__'s truncation, on one encoding that also tells whether it cut
        words = self.tokenizer.encode(caption)
        cut = len(words) + 2 > self.context_length  # + start and end of text
        kept = [self.tokenizer.sot_token_id, *words][: self.context_length - 1]
        ids = [*kept, self.tokenizer.eot_token_id]
        tokens = torch.zeros(self.context_length, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids)
        return tokens, cut


class CLIP(SSLMethod):
    """CLIP pretraining (Radford et al., 2021): an image tower and a text tower.

    The ViT's pooled embedding (timm's ``forward_head(pre_logits=True)``: the
    CLS token after the final norm, as open_clip's ViTs pool) times a projection matrix, and
    open_clip's ``TextTransformer`` (causal attention, the end-of-text token's embedding,
    projected), both L2-normalised; logits = exp(logit_scale) x cosine similarity.

    Args:
        embed_dim: the shared width both towers project to (512 for ViT-B).
        context_length, vocab_size, text_width, text_heads, text_layers: the text tower
            (open_clip's ViT-B text config: 77 tokens, 49,408 BPE tokens, 512 wide, 8 heads, 12 layers).
        init_logit_scale: log(1 / temperature) at the start, ln(1 / 0.07) as in open_clip; the
            scale is learned and clamped to ``max_logit_scale`` (ln 100) after every optimiser step.
        base_lr, weight_decay, warmup_epochs, min_lr, betas: open_clip's ``params.py`` defaults
            for ViTs (lr 5e-4 at any batch, AdamW betas 0.9 / 0.98, eps 1e-6), weight decay 0.2 and
            its 10,000 warm-up steps as epochs of the paper run, cosine to 0.
    """

    paper_run = PaperRun(epochs=32, steps_per_epoch=LAION_STEPS_PER_EPOCH)
    lr_batch_rule: ClassVar = "none"  # open_clip's --lr is the lr, whatever the batch
    adam_eps: ClassVar[float] = 1e-6

    def __init__(
        self,
        encoder: EncoderConfig,
        embed_dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_heads: int = 8,
        text_layers: int = 12,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        base_lr: float = 5e-4,
        weight_decay: float = 0.2,
        warmup_epochs: float = 10_000 / LAION_STEPS_PER_EPOCH,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        init_from: str | None = None,
        scale_to_run: bool = True,
    ) -> None:
        super().__init__(
            encoder,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            init_from=init_from,
            scale_to_run=scale_to_run,
        )
        width = self.encoder.embed_dim
        initialise_as_open_clip(self.encoder.vit)
        # open_clip's VisionTransformer.proj: a (width, embed_dim) matrix drawn at width^-0.5
        self.image_projection = nn.Parameter(width**-0.5 * torch.randn(width, embed_dim))
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
            output_dim=embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.caption_tokens = CaptionTokens(context_length)  # what the data module reads captions with

    @property
    def patch_size(self) -> int:
        """The image tower's patches, in pixels (an open_clip folder's ``patch_size`` too)."""
        return self.encoder.patch_size

    def embed_images(self, images: Tensor) -> Tensor:
        pooled = self.encoder.vit.forward_head(self.encoder(images).tokens, pre_logits=True)
        return F.normalize(pooled @ self.image_projection, dim=-1)

    def embed_texts(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, tokens = batch
        image, text = self.embed_images(images), self.embed_texts(tokens)
        loss = clip_loss(image, text, self.logit_scale.exp())
        self.watch_collapse(image)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.logit_scale.exp())
        return loss

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        # open_clip_train/train.py: clamp to [0, ln 100] after each optimiser step
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def learning_rate(self, step: int, per_device_batch: int) -> float:
        # open_clip's warm-up counts the step being taken (``_warmup_lr``: lr x (step + 1) / W);
        # its cosine starts at step W, as the base's does
        taken = step + 1 if step < self.warmup_steps() else step
        return super().learning_rate(taken, per_device_batch)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """open_clip's ``make_wd_exclude``: no decay for 1-D parameters (norms, biases, the logit
        scale) nor for the names the towers' ``no_weight_decay()`` give: the class embedding
        (timm's (1, 1, D) CLS token here) and both towers' position embeddings. The token
        embedding and the projections decay."""
        return super().decays(name, param) and name not in NOT_DECAYED


def clip_from_checkpoint(ckpt: dict[str, Any], checkpoint: str | Path) -> CLIP:
    """The CLIP model of a read checkpoint (``checkpoint`` names it in messages)."""
    if objective_name(ckpt) != CLIP.__name__:
        raise UserError(f"{checkpoint} is a {objective_name(ckpt)} checkpoint; this needs a CLIP one (image and text)")
    settings = inspect.signature(CLIP).parameters
    model = CLIP(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in settings and k != "init_from"})
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


#: What ``ssl-vit export --format open_clip`` writes, and what --overwrite may replace.
OPEN_CLIP_FOLDER = OutputKind(
    "an open_clip folder (open_clip_config.json, open_clip_model.safetensors, README.md)",
    ("open_clip_config.json", "open_clip_model.safetensors", "README.md"),
    required=("open_clip_config.json", "open_clip_model.safetensors"),
    record="open_clip_config.json",
)


#: What open_clip's towers exclude from weight decay by name (``no_weight_decay()``), as ssl-vit names them.
NOT_DECAYED = ("encoder.vit.cls_token", "encoder.vit.pos_embed", "text.positional_embedding")


@torch.no_grad()
def initialise_as_open_clip(vit: VisionTransformer) -> None:
    """timm's ViT drawn as open_clip's ``VisionTransformer`` is: class and position embeddings at
    width^-0.5, attention's qkv Xavier-uniform with zero biases, its output projection PyTorch's
    default with a zero bias (``nn.MultiheadAttention``'s initialisation), the MLP and the patch
    convolution PyTorch's defaults (its ``init_parameters`` draws nothing else)."""
    if type(vit) is not VisionTransformer:  # an image tower open_clip has no ViT of (RoPE): its own initialisation
        return
    scale = vit.embed_dim**-0.5
    vit.cls_token.normal_(std=scale)
    vit.pos_embed.normal_(std=scale)
    vit.patch_embed.proj.reset_parameters()
    if vit.patch_embed.proj.bias is not None:  # open_clip's patch convolution has none
        vit.patch_embed.proj.bias.zero_()
    for block in vit.blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        block.attn.proj.reset_parameters()
        for linear in (block.attn.qkv, block.attn.proj):
            if linear.bias is not None:
                linear.bias.zero_()
        block.mlp.fc1.reset_parameters()
        block.mlp.fc2.reset_parameters()


def open_clip_vision(vit: nn.Module, projection: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A timm ViT and its projection as open_clip's own ``VisionTransformer``: its ``vision_cfg``
    and ``visual.*`` weights, the same function of the image. timm's patch bias (open_clip's patch
    convolution has none) is added to the patch positions, which it always meets; missing
    attention and MLP biases are zeros."""
    if type(vit) is not VisionTransformer:
        raise UserError(
            f"open_clip's ViT has learned absolute positions only; this image tower is a {type(vit).__name__}"
        )
    pooling = {"token": "tok", "avg": "avg"}.get(vit.global_pool)
    unsupported = {
        "no class token": not vit.has_class_token or vit.no_embed_class,
        "register tokens": vit.num_reg_tokens > 0,
        f"global_pool {vit.global_pool!r}": pooling is None,
        "a patch-embedding norm": not isinstance(vit.patch_embed.norm, nn.Identity),
        "q/k norms or other attention extras": any(
            not isinstance(getattr(b.attn, n, nn.Identity()), nn.Identity)
            for b in vit.blocks
            for n in ("q_norm", "k_norm", "norm")
        ),
        "an activation other than GELU": any(
            type(b.mlp.act) is not nn.GELU or b.mlp.act.approximate != "none" for b in vit.blocks
        ),
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise UserError(f"open_clip's VisionTransformer cannot hold this image tower ({', '.join(found)})")
    width, first = vit.embed_dim, vit.blocks[0]
    cfg = {
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "width": width,
        "layers": len(vit.blocks),
        "head_width": width // first.attn.num_heads,
        "mlp_ratio": first.mlp.fc1.out_features / width,
        "ls_init_value": 1.0 if hasattr(first.ls1, "gamma") else None,  # any value: the weights replace it
        "no_ln_pre": isinstance(vit.norm_pre, nn.Identity),
        "pool_type": pooling,
        "final_ln_after_pool": pooling == "avg",  # timm's avg pooling norms after pooling (fc_norm)
        "norm_kwargs": {"eps": vit.norm_pre.eps if not isinstance(vit.norm_pre, nn.Identity) else first.norm1.eps},
    }
    pos = vit.pos_embed[0].clone()
    if vit.patch_embed.proj.bias is not None:
        pos[1:] += vit.patch_embed.proj.bias
    state = {
        "conv1.weight": vit.patch_embed.proj.weight,
        "class_embedding": vit.cls_token.reshape(width),
        "positional_embedding": pos,
        "proj": projection,
        **_norm("ln_post", vit.fc_norm if pooling == "avg" else vit.norm),
        **({} if cfg["no_ln_pre"] else _norm("ln_pre", vit.norm_pre)),
    }
    for i, block in enumerate(vit.blocks):
        prefix, attn, mlp = f"transformer.resblocks.{i}.", block.attn, block.mlp
        state.update(_norm(prefix + "ln_1", block.norm1) | _norm(prefix + "ln_2", block.norm2))
        state.update(_linear(prefix + "attn.in_proj_", attn.qkv) | _linear(prefix + "attn.out_proj.", attn.proj))
        state.update(_linear(prefix + "mlp.c_fc.", mlp.fc1) | _linear(prefix + "mlp.c_proj.", mlp.fc2))
        if cfg["ls_init_value"] is not None:
            state |= {prefix + "ls_1.gamma": block.ls1.gamma, prefix + "ls_2.gamma": block.ls2.gamma}
    return cfg, {f"visual.{k}": v.detach().contiguous() for k, v in state.items()}


def _norm(name: str, norm: nn.LayerNorm) -> dict[str, Tensor]:
    return {f"{name}.weight": norm.weight, f"{name}.bias": norm.bias}


def _linear(prefix: str, linear: nn.Linear) -> dict[str, Tensor]:
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return {f"{prefix}weight": linear.weight, f"{prefix}bias": bias}


def open_clip_folder_contents(model: CLIP) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``open_clip_config.json`` and the weights of ``model`` as open_clip's ``CustomTextCLIP``:
    the image tower as its ``VisionTransformer``, the text tower as it is (it is open_clip's
    ``TextTransformer``), the logit scale."""
    vision_cfg, state = open_clip_vision(model.encoder.vit, model.image_projection)
    hp, vit = model.hparams, model.encoder.vit
    text_cfg = {
        "context_length": hp.context_length,
        "vocab_size": hp.vocab_size,
        "width": hp.text_width,
        "heads": hp.text_heads,
        "layers": hp.text_layers,
    }
    state |= {f"text.{k}": v.detach().contiguous() for k, v in model.text.state_dict().items()}
    state["logit_scale"] = model.logit_scale.detach().clone()
    size = vit.patch_embed.img_size[0]
    preprocess = {"size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"}
    model_cfg = {"embed_dim": hp.embed_dim, "custom_text": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}, state


def export_open_clip(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A CLIP checkpoint as a folder that ``open_clip.create_model_and_transforms("local-dir:OUT")``
    and ``open_clip.get_tokenizer("local-dir:OUT")`` load, written atomically; ``overwrite``
    replaces an earlier open_clip folder only."""
    check_replaceable(out, OPEN_CLIP_FOLDER, overwrite, reads=[checkpoint])
    ckpt = read_checkpoint(checkpoint)
    config, state = open_clip_folder_contents(clip_from_checkpoint(ckpt, checkpoint))
    config["ssl_vit"] = provenance(ckpt, checkpoint, "encoder")  # beside open_clip's keys, which it reads alone

    def write(folder: Path) -> None:
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(folder / "open_clip_model.safetensors"))
        (folder / "README.md").write_text(open_clip_card(config["ssl_vit"]))

    return replace_output(out, write, OPEN_CLIP_FOLDER, overwrite, reads=[checkpoint])


def open_clip_card(record: dict[str, Any]) -> str:
    """The README of an open_clip folder: where it came from, the run's results, how to load it."""
    about = [
        "- objective: CLIP (image and text towers)",
        "- embeddings: open_clip's `model.encode_image(images)` and `model.encode_text(tokenizer(texts))`",
    ]
    load = [
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH_TO_THIS_FOLDER")',
        'tokenizer = open_clip.get_tokenizer("local-dir:PATH_TO_THIS_FOLDER")',
    ]
    return card("CLIP image and text towers", record, about, *run_evaluation(record), "open_clip", load)


class OpenCLIPFolder(nn.Module):
    """A folder ``open_clip.create_model("local-dir:...")`` loads (as ``export_open_clip`` writes
    them), with the embeddings and tokenizer the image-text protocols use, and the evaluation view
    its images take (``view``: ``EvalView``'s settings): an ssl-vit export's is the run's, so that
    it gives the same protocol numbers as its checkpoint; another folder's is its own
    ``preprocess_cfg`` as open_clip's eval transform reads it (resize the short side to the
    crop, centre-crop, its mean and std: OpenAI's when it names none)."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        config_path = Path(folder) / "open_clip_config.json"
        if not config_path.is_file():
            raise UserError(
                f"{folder} has no open_clip_config.json; pass a CLIP .ckpt, a run folder or an open_clip folder"
            )
        config = json.loads(config_path.read_text())
        model_cfg = config.get("model_cfg", {})
        text_cfg = model_cfg.get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            raise UserError(f"{folder} uses a Hugging Face tokenizer; ssl-vit reads captions with open_clip's own")
        self.model = open_clip.create_model(f"local-dir:{folder}")
        self.caption_tokens = CaptionTokens(text_cfg.get("context_length", 77))
        self.image_size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        self.patch_size = model_cfg.get("vision_cfg", {}).get("patch_size")
        self.view: dict[str, Any] = {} if "ssl_vit" in config else open_clip_eval_view(folder, config)

    def embed_images(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images, normalize=True)

    def embed_texts(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens, normalize=True)


def open_clip_eval_view(folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """``EvalView``'s settings for what open_clip's eval transform does with a folder's
    ``preprocess_cfg`` (``open_clip.transform.image_transform``, ``resize_mode: shortest``)."""
    from open_clip.transform import PreprocessCfg

    fields = PreprocessCfg.__dataclass_fields__
    cfg = PreprocessCfg(**{k: v for k, v in config.get("preprocess_cfg", {}).items() if k in fields})
    if cfg.resize_mode != "shortest" or cfg.interpolation not in ("bicubic", "bilinear"):
        raise UserError(
            f"{folder}'s preprocess_cfg resizes by {cfg.resize_mode!r} with {cfg.interpolation!r}; ssl-vit "
            "evaluates open_clip folders that resize the shortest side, bicubic or bilinear"
        )
    return {"crop_pct": 1.0, "mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": cfg.interpolation}


def load_image_text_model(source: str | Path) -> tuple[nn.Module, int, dict[str, Any]]:
    """A CLIP checkpoint or an open_clip folder as an image-text model, its image size, and what
    it is (for the records; ``view``: the evaluation view's settings other than the default's)."""
    path = Path(source)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        model = OpenCLIPFolder(path)
        record = json.loads((path / "open_clip_config.json").read_text()).get("ssl_vit", {})  # ssl-vit's exports
        info = {"method": "CLIP", "format": "open_clip", "step": record.get("step"), "view": model.view}
        trained_on = record.get("trained_on")
        trained_on = (trained_on, record.get("data", {}).get("val_shards")) if trained_on else None
        return model, model.image_size, info | {"trained_on": trained_on}
    if path.is_dir():
        path = run_checkpoint(
            path,
            "it has no open_clip_config.json either; pass a CLIP .ckpt, its run folder, or a folder "
            "`ssl-vit export --format open_clip` wrote (a timm export holds the image tower only)",
        )
    ckpt = read_checkpoint(path)
    model = clip_from_checkpoint(ckpt, path)
    info = {"method": "CLIP", "checkpoint": str(path), "step": ckpt.get("global_step")}
    # where its training data was, so that an evaluation on it says so
    trained_on = ckpt.get(RUN_KEY, {}).get("train_shards")
    trained_on = (trained_on, data_settings(ckpt).get("val_shards")) if trained_on else None
    return model, model.encoder.image_size, info | {"trained_on": trained_on}
