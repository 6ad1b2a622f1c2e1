"""Model side of the pipeline: load a pretrained BERT with a fresh classification head, group its
parameters for AdamW, save the fine-tuned result for serving, and load it back for inference.

The saved folder is a plain `save_pretrained` folder (safetensors weights, config with label
names, tokenizer files), so `transformers.pipeline("text-classification", model=folder)` reads it.
"""

import os
import platform
import re
import shutil

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from training.errors import UsageError, require_local_or_reachable


# -----------------------------------------------------------------------------
# loading for training


def load_tokenizer(name_or_path):
    """The tokenizer that came with the pretrained model (WordPiece for BERT)."""
    require_local_or_reachable(name_or_path, "--model_name_or_path", "model")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--model_name_or_path {name_or_path!r}: cannot load a tokenizer from it ({first_line(err)}). "
            "Pass a Hub model id such as bert-base-uncased or a folder written by save_pretrained."
        ) from None


def load_model(name_or_path, label_names, attn_implementation=None):
    """Pretrained encoder + a new, randomly initialised classification head with one output per label.

    `id2label`/`label2id` go into the model's config, so the saved model answers with the
    dataset's own label names ("neg"/"pos") instead of LABEL_0/LABEL_1.
    """
    require_local_or_reachable(name_or_path, "--model_name_or_path", "model")
    id2label = dict(enumerate(label_names))
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            attn_implementation=attn_implementation,  # None: the model's default (sdpa)
        )
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--model_name_or_path {name_or_path!r}: cannot load a model from it ({first_line(err)}). "
            "Pass a Hub model id such as bert-base-uncased or a folder written by save_pretrained."
        ) from None


def first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# -----------------------------------------------------------------------------
# optimizer


def decays(param_name, module):
    """Trainer's rule: weight decay pulls weights towards zero; biases and LayerNorm weights are
    offsets and scales that should stay free, so they are excluded."""
    return not isinstance(module, nn.LayerNorm) and not param_name.endswith("bias")


def optimizer_param_groups(model, weight_decay):
    """Two AdamW groups: matrices and embeddings with `weight_decay`, the rest with none."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (decay if decays(name, module) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# -----------------------------------------------------------------------------
# saving and loading for serving


def save_for_serving(accelerator, model, tokenizer, out_dir, card=None):
    """Write the bare model (no DDP/compile wrappers) as safetensors + its tokenizer, and `card` (a
    huggingface_hub ModelCard, training/model_card.py) as README.md when given.

    Every process must call this: `get_state_dict` gathers sharded weights collectively;
    only the main process writes. The weights keep the model's own names: torch.compile's wrapper
    prefixes each with `_orig_mod.`, and a folder saved so loads as a freshly initialised model
    (transformers only warns), so the prefix is taken off and the names checked.

    Written beside `out_dir` and moved into place once complete: a kill or a full disk mid-save
    leaves the previous model (or none), never a half-written one that a server would load.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        partial = f"{os.path.normpath(out_dir)}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier interrupted save
        try:
            write_weights(accelerator, model, state_dict, partial)
            tokenizer.save_pretrained(partial)
            if card is not None:
                card.save(os.path.join(partial, "README.md"))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        replace_folder(partial, out_dir)
    accelerator.wait_for_everyone()


def write_weights(accelerator, model, state_dict, out_dir):
    """The bare model's config and `state_dict` (accelerate's get_state_dict: gathered, full) as
    safetensors in `out_dir`, under the model's own weight names. The main process calls this.

    save_original_format=False: under DeepSpeed ZeRO-3, transformers 5 records its legacy renames
    at load time and "reverts" them at save time, writing LayerNorm.gamma/beta for weight/bias.
    """
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    bare.save_pretrained(out_dir, state_dict=own_names(state_dict), safe_serialization=True, save_original_format=False)


def replace_folder(new, old):
    """Put folder `new` where `old` is: two renames, so `old` is never half-written."""
    previous = f"{os.path.normpath(old)}.previous"
    if os.path.isdir(old):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(old, previous)
    os.replace(new, old)
    shutil.rmtree(previous, ignore_errors=True)


# The attribute a wrapper keeps the model under, which then stands in every weight's name: DDP's
# `module.` in front, torch.compile's `_orig_mod.` in front (the whole model compiled) or inside
# (accelerate's regional compilation compiles each block: bert.embeddings._orig_mod.word_embeddings...).
WRAPPERS = re.compile(r"(?:^module\.)|(?:(?<=^)|(?<=\.))_orig_mod\.")


def own_names(state_dict):
    """The state_dict with the model's own weight names, whatever wrappers it was read through."""
    return {own_name(name): tensor for name, tensor in state_dict.items()}


def own_name(name):
    while (bare := WRAPPERS.sub("", name)) != name:  # wrappers inside wrappers: peel until none is left
        name = bare
    return name


def load_for_inference(model_dir, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a folder written by `save_for_serving`, ready for `inference_mode`,
    its weights in `dtype` on `device`.

    safetensors only and no remote code: loading a served model must never execute a pickle.
    """
    check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=False, dtype=dtype
    )
    model.to(device).eval()
    return model, tokenizer


def check_model_dir(model_dir):
    """Fail with a UsageError unless `model_dir` looks like a save_pretrained folder with safetensors.

    Cheap (no loading), so a server can refuse a wrong path before it binds its port.
    """
    if not os.path.isdir(model_dir):
        raise UsageError(
            f"model folder {model_dir!r} does not exist. Train first (python train_loop.py writes "
            "./fine-tuned-bert) or pass a folder written by save_pretrained."
        )
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(
            f"model folder {model_dir!r} has no config.json. Train first (python train_loop.py writes "
            "./fine-tuned-bert) or pass a folder written by save_pretrained."
        )
    if not any(f.endswith(".safetensors") for f in os.listdir(model_dir)):
        raise UsageError(f"model folder {model_dir!r} has no .safetensors weights; only safetensors are loaded.")


def count_parameters(model, embeddings=True):
    """Parameters of `model`. embeddings=False leaves out the embedding tables (every nn.Embedding):
    the N of FLOP estimates, since a table lookup is not a matmul. (The embeddings' LayerNorm, a
    few hundred numbers, counts as non-embedding, as every other LayerNorm does.)"""
    tables = set() if embeddings else {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def device_name(device):
    """A GPU's name (NVIDIA H100 ..., say), or the CPU's model as the kernel reports it: for banners."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or device.type


def label_names(model):
    """Label names in class-index order, from the config written at training time."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def classify(model, tokenizer, texts, max_length=None):
    """Class probabilities (len(texts), num_labels) for a list of texts, truncated to the model's limit."""
    max_length = max_length or model_max_length(model, tokenizer)
    return classify_encoded(model, tokenizer, tokenizer(texts, truncation=True, max_length=max_length))


@torch.inference_mode()
def classify_encoded(model, tokenizer, encoded):
    """Class probabilities (B, num_labels) for texts already tokenized (lists of ids, unpadded):
    padded here to the longest, in fp32 whatever the model's dtype."""
    batch = tokenizer.pad(encoded, return_tensors="pt").to(model.device)
    logits = model(**batch).logits  # (B, num_labels)
    return logits.float().softmax(dim=-1)


def bare_tokenizer(tokenizer):
    """A copy of the fast tokenizer's Rust core with no padding and no truncation: the saved
    tokenizer.json may carry both, and transformers' own call changes them on the shared core."""
    if not tokenizer.is_fast:
        raise ValueError("the model folder has no fast tokenizer (tokenizer.json); save_pretrained writes one")
    core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    core.no_padding()
    core.no_truncation()
    return core


def model_max_length(model, tokenizer):
    """The longest input the model accepts: its position table, or less if the tokenizer says so."""
    limit = model.config.max_position_embeddings
    tok_limit = tokenizer.model_max_length
    return min(limit, tok_limit) if tok_limit and tok_limit < 1_000_000 else limit
