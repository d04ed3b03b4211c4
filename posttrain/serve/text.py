"""Token ids to streamed text pieces, cut at stop strings; and picking one token from a row's logits."""

from __future__ import annotations

import torch


class TextStream:
    """Feed sampled token ids; get back text pieces that concatenate to the completion's text, cut before the
    first stop string.

    A piece is released only once it cannot change: byte-level BPE splits multi-byte characters across tokens
    (a half character decodes to U+FFFD), and text that might be the start of a stop string is held back until
    the next tokens show whether it is one. The streamed and the non-streamed answer are both the join of these
    pieces, so they are equal by construction.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the last stable piece (context for the next one)
        self.text = ""  # the stable text so far
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _unread(self) -> str:
        # Decoding a short window instead of the whole completion keeps each step O(1) in its length.
        return self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]

    def push(self, token_id: int) -> tuple[str, bool]:
        """The newly releasable text, and whether a stop string has now appeared (the stream is then over)."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        new = self._unread()
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """The rest at the end of generation, a trailing partial character included."""
        if self.stopped:
            return ""
        self.text += self._unread()
        self.prefix = self.read = len(self.ids)
        piece, stopped = self._release()
        if stopped:
            return piece
        rest, self.sent = self.text[self.sent:], len(self.text)
        return piece + rest

    def _release(self) -> tuple[str, bool]:
        # Held-back text is never released, so a stop string can only start at or after self.sent.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            piece, self.sent, self.stopped = self.text[self.sent:min(hits)], min(hits), True
            return piece, True
        end = len(self.text) - self._held()
        piece, self.sent = self.text[self.sent:end], end
        return piece, False

    def _held(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


def sample_token(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from a row's ``(V,)`` logits: argmax at temperature 0; otherwise nucleus sampling, keeping the
    most probable tokens until their mass reaches ``top_p`` (the token that crosses it included)."""
    if temperature == 0:
        return int(logits.argmax())
    from posttrain.rollout.sample import nucleus

    probs = nucleus(torch.softmax(logits.float().cpu() / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
