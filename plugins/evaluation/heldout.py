"""Per-document scoring of held-out text: sliding windows, batched, each token scored once.

A document is ``[bos] + encode(text) + [eos]``; every token after ``bos`` is predicted from that
document's earlier tokens only. A document longer than the window is scored in windows whose
ends advance by ``stride``: each window scores only the tokens the previous one did not, with
the rest of the window as context (at least ``window - stride`` tokens of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    doc: int  # index of the document
    begin: int  # inputs are ids[begin:end], labels ids[begin + 1:end + 1]
    end: int
    skip: int  # the first `skip` labels were scored by an earlier window

    @property
    def length(self) -> int:
        return self.end - self.begin


def plan_windows(num_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows that score tokens ``1 .. num_tokens - 1`` of one document, each exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    last = num_tokens - 1  # index of the last label
    if last < 1:
        return []
    end = min(window, last)
    windows = [Window(doc, 0, end, 0)]
    while end < last:
        new_end = min(end + stride, last)
        begin = max(0, new_end - window)
        windows.append(Window(doc, begin, new_end, end - begin))
        end = new_end
    return windows


@torch.inference_mode()
def score_documents(
    model: torch.nn.Module,
    docs: Sequence[Sequence[int]],
    window: int,
    stride: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Total negative log-likelihood (nats) of tokens ``1:`` of each document."""
    windows = [w for i, ids in enumerate(docs) for w in plan_windows(len(ids), window, stride, i)]
    # longest first: batches of similar lengths waste little on padding
    windows.sort(key=lambda w: (-w.length, w.doc, w.begin))
    nll = [0.0] * len(docs)
    total = sum(w.length - w.skip for w in windows)
    done = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = batch[0].length
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, w in enumerate(batch):
            ids = docs[w.doc]
            inputs[row, :w.length] = torch.as_tensor(ids[w.begin:w.end])
            labels[row, w.skip:w.length] = torch.as_tensor(ids[w.begin + 1 + w.skip:w.end + 1])
        # right padding needs no attention mask: causal attention never looks right
        logits = model(inputs.to(device)).float()
        losses = F.cross_entropy(
            logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100, reduction="none"
        ).view(len(batch), width).double().sum(dim=1).tolist()
        for w, loss in zip(batch, losses):
            nll[w.doc] += loss
            done += w.length - w.skip
        if progress:
            progress(done, total)
    return nll
