"""Output projection and cross-entropy in one pass over row chunks, never holding the logits of
the whole batch.

The textbook head writes (tokens x vocab) logits, upcasts them, log-softmaxes them, and in
backward writes their gradient twice more: with a 32000-word vocabulary that is the largest
tensor of a small model's step and several full passes over memory. Here each chunk of rows
gets its logits, its loss and at once its logits' gradient (softmax minus one-hot, exact
because the loss is the last operation), which is multiplied into the gradients of the hidden
states and of the weight before the next chunk reuses the buffer. Backward then only scales
what forward stored. The same idea as Liger Kernel's fused linear cross-entropy and litgpt's
chunked cross-entropy, in plain PyTorch so that it runs on every device.
"""

from __future__ import annotations

from typing import Callable

import torch

# Logits per chunk: 2^24 is 64 MB in fp32, 512 rows of a 32000-word vocabulary. Smaller chunks
# save memory but make the weight-gradient matmuls thinner; 512 to 2048 rows ran equally fast
# on a CPU (benchmarks/README.md).
CHUNK_ELEMENTS = 2**24

ChunkKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def log_probs_and_loss(logits: torch.Tensor, targets: torch.Tensor,
                       valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (fp32 or wider) of a chunk of logits, and the summed cross-entropy of its
    `valid` rows."""
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_probs, -(log_probs.gather(1, targets[:, None]).squeeze(1) * valid).sum()


def softmax_cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor,
                               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the `valid` rows of a chunk of logits, and its gradient with
    respect to the logits before the mean's scaling (softmax minus one-hot; exact because the
    loss is the last operation), in the logits' dtype. Compiling it (apply_compile does when
    the blocks are compiled) fuses these passes over the wide chunk into about two."""
    log_probs, loss = log_probs_and_loss(logits, targets, valid)
    grad = log_probs.exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(grad[:, :1], -1.0))
    return loss, grad.to(logits.dtype)


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, rounded down to a multiple of 64 because
    matmul kernels tile by powers of two (at vocab 32000 the plain quotient, 524 rows, ran the
    three matmuls 6% slower than 512 on a CPU)."""
    return max(64, CHUNK_ELEMENTS // vocab_size // 64 * 64)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None,
                         chunk_kernel: ChunkKernel = softmax_cross_entropy_grad) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index)` (mean over the
    labels that are not ignored), computed chunk by chunk.

    Under autocast the matmuls run in the autocast dtype, as an autocast nn.Linear's would; the
    softmax and the loss are always fp32, and the weight gradient is accumulated in fp32."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), ignore_index, chunk_rows,
                                     compute_dtype, needs_grad, chunk_kernel)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, compute_dtype, needs_grad, chunk_kernel):
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
            valid = labels != ignore_index
            n_valid = valid.sum()
            # Per-row factor of the gradient of the mean: 1/n for counted rows, 0 for ignored ones.
            row_scale = valid.to(softmax_dtype) / n_valid
            targets = torch.where(valid, labels, 0)
            loss_sum = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if needs_grad else None
            grad_weight = None
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = h[rows] @ w.T
                if not needs_grad:
                    loss_sum += log_probs_and_loss(logits, targets[rows], valid[rows])[1]
                    continue
                chunk_loss, grad_logits = chunk_kernel(logits, targets[rows], valid[rows])
                loss_sum += chunk_loss
                # row_scale multiplies the thin operands of the two matmuls instead of the wide gradient.
                scale = row_scale[rows, None]
                grad_hidden[rows] = (grad_logits @ w) * scale
                scaled_h = (h[rows] * scale).to(compute_dtype)
                if grad_weight is None:
                    grad_weight = (grad_logits.T @ scaled_h).to(softmax_dtype)
                elif compute_dtype == softmax_dtype:
                    grad_weight.addmm_(grad_logits.T, scaled_h)
                else:
                    # Upcast, then add: an add_ that promotes bf16 itself took 3x as long on a CPU.
                    grad_weight += (grad_logits.T @ scaled_h).to(softmax_dtype)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The loss is usually scaled (1 / gradient-accumulation steps) before backward.
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)),
                grad_weight.mul_(grad_loss).to(ctx.weight_dtype), None, None, None, None, None, None)
