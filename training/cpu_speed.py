"""Two speed-ups for training on a CPU, both measured in BENCHMARKS.md, neither changing the math.

1. Dropout masks from a faster random-number generator (`use_fast_dropout`).

   Dropout zeroes each activation with probability p and scales the survivors by 1 / (1 - p).
   The math is cheap; drawing the random mask is not. torch's CPU dropout (`bernoulli_`) draws
   tens of millions of samples a second, and BERT drops out a lot of numbers: the attention
   probabilities alone are batch x heads x T x T per layer (8 x 12 x 300 x 300 = 8.6M draws).
   Profiled on a 2-core CPU, that was a quarter of a MiniLM training step, more than half as
   long as all the matmuls (BENCHMARKS.md).

   Here the mask comes from numpy's PCG64 instead: one 64-bit draw gives four 16-bit numbers, and
   an element is kept where its number is at least p x 65536. Same Bernoulli(1 - p) masks, with p
   rounded to a multiple of 1/65536 (0.1 becomes 0.100006), drawn several times faster.
   Each mask's PCG64 is seeded with one draw from torch's own generator, so `set_seed` still fixes
   every mask and a checkpoint (accelerate saves torch's RNG state) still resumes bit for bit.

   On a GPU torch's dropout uses a counter-based generator and SDPA's fused kernels apply it
   inside attention: the stock path is already the fast one there, so this is for CPUs only.
   Evaluation never draws masks (dropout is off in eval mode), so predictions do not change.

2. Freed tensor memory kept for reuse (`reuse_freed_memory`).

   On CPU, torch allocates every activation with malloc and frees it after the backward pass.
   glibc hands out blocks above 32 MB (one attention-probability tensor at batch 8 and 512 tokens
   is 100 MB) with a fresh mmap each time, and the kernel then zero-fills every page on first
   touch: a new 100 MB tensor costs more in page faults than in arithmetic. Telling glibc to serve all sizes from
   its heap and to keep freed memory there removes that cost, at the price of the process holding
   on to its peak memory.
"""

import ctypes
import math

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from training.engines import compile_backend

ATTENTION_NAME = "sdpa_fast_dropout"


# -----------------------------------------------------------------------------
# the mask and the dropout itself


def keep_mask(shape, p):
    """A bool tensor of `shape`, each element True with probability 1 - p."""
    with torch.profiler.record_function("cpu_speed::keep_mask"):  # named in profiles (--profile_steps)
        numel = math.prod(shape)
        seed = int(torch.randint(0, 2**62, ()))  # one draw from torch's generator: set_seed and resume hold
        bits = np.random.PCG64(seed).random_raw((numel + 3) // 4)  # 64 random bits per draw
        # Read as signed int16 (torch compares those natively): 4 per draw, uniform in [-32768, 32767].
        uniform16 = torch.from_numpy(bits.view(np.int16)[:numel])
        dropped = min(round(p * 65536), 65535)  # how many of the 65536 values mean "drop"
        return (uniform16 >= dropped - 32768).view(shape)


class MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - p). The backward pass reuses the same bool mask (1 byte per element),
    as torch's own dropout does."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def apply_dropout(x, p, training=True):
    if not training or p == 0.0:
        return x
    if p >= 1.0:  # everything dropped, as nn.Dropout(1.0) does
        return x * 0.0
    return MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """nn.Dropout with the faster mask; same `p`, same train/eval behaviour."""

    def forward(self, x):
        return apply_dropout(x, self.p, self.training)


# -----------------------------------------------------------------------------
# attention: SDPA, except that training draws its dropout mask here


def attention_with_fast_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Without dropout (evaluation, or p = 0): exactly the model's SDPA path.

    With dropout, attention is spelled out so that the probabilities can be dropped with our mask.
    torch's CPU SDPA takes an unfused path like this one whenever dropout_p > 0, so no fused kernel
    is lost. The (B, heads, T, T) tensors dominate the memory traffic, so every cheap step is done
    on a smaller tensor instead: the 1/sqrt(head_dim) scaling on the queries, the 1/(1 - p) dropout
    scaling on the output, and the padding mask as an in-place add. Scores and softmax are fp32
    even under bf16 autocast.
    Written for encoder self-attention (BERT and its relatives): anything else (causal, grouped
    key/value heads, soft-capping, position biases) goes to SDPA unchanged.
    Shapes: query/key/value (B, heads, T, head_dim); mask (B, 1, T, T) bool, True = may attend.
    """
    plain_encoder = (not kwargs.get("is_causal", getattr(module, "is_causal", False))
                     and getattr(module, "num_key_value_groups", 1) == 1
                     and not kwargs.get("softcap") and kwargs.get("position_bias") is None)
    if dropout == 0.0 or dropout >= 1.0 or not plain_encoder:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(-1, -2)).float()  # (B, heads, T, T)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # padding keys: softmax gives them 0
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        scores.add_(attention_mask.to(scores.dtype))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(keep_mask(probs.shape, dropout), probs, 0).to(value.dtype)  # dropout, unscaled ...
    out = torch.matmul(probs, value) / (1.0 - dropout)  # ... scaled here: (B, heads, T, head_dim)
    return out.transpose(1, 2).contiguous(), None  # (B, T, heads, head_dim), as the SDPA path returns


# -----------------------------------------------------------------------------
# installing both


def use_fast_dropout(model):
    """Swap every nn.Dropout in `model` for FastDropout and, if the model runs SDPA attention,
    route attention through attention_with_fast_dropout (registered with transformers here, when
    switched on, not at import). Returns the model, changed in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout and not child.inplace:  # FastDropout returns a new tensor
                setattr(module, name, FastDropout(child.p).train(child.training))
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(ATTENTION_NAME, attention_with_fast_dropout)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same bool masks SDPA gets
        model.set_attn_implementation(ATTENTION_NAME)
    return model


def reuse_freed_memory():
    """Ask glibc to serve every allocation from its heap and keep freed memory for the next step.

    mallopt is process-wide and cannot be undone: it holds for everything else in the process
    (whoever calls train_loop.run_training in their own process, tests and benchmarks included),
    until the process exits. Returns False (and changes nothing) where the C library is not glibc,
    e.g. on macOS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers, from glibc's malloc.h
    no_mmap = libc.mallopt(m_mmap_max, 0)  # never mmap a block: no zero-filled fresh pages per tensor
    keep = libc.mallopt(m_trim_threshold, 2**31 - 1)  # give memory back to the OS only above 2 GB free
    return bool(no_mmap and keep)


def speed_up_training(cfg, model, accelerator):
    """The two CPU-only speed-ups above, for a model about to train on a CPU (a GPU needs neither),
    each as its flag says. Returns what is in effect, for the banner: nothing non-stock happens
    without the run saying so."""
    speedups = []
    if cfg.fast_dropout and compile_backend(cfg):  # numpy inside forward() would split dynamo's graph
        accelerator.print("--fast_dropout is off under torch.compile: torch's own dropout is used.")
    elif cfg.fast_dropout:
        use_fast_dropout(model)
        in_attention = model.config._attn_implementation == ATTENTION_NAME
        where = "dropout layers and attention" if in_attention else "dropout layers"
        speedups.append(f"dropout masks from numpy's PCG64 in {where} (cpu_speed.py; off: --fast_dropout false)")
    if cfg.reuse_cpu_memory and reuse_freed_memory():
        speedups.append("glibc keeps freed memory for reuse, process-wide (cpu_speed.py; off: --reuse_cpu_memory false)")
    elif cfg.reuse_cpu_memory:
        accelerator.print("--reuse_cpu_memory needs glibc's malloc (Linux); this C library keeps its own policy.")
    return speedups
