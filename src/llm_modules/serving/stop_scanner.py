"""Stop sequences cut from answer text, streamed or not."""

from __future__ import annotations


class StopScanner:
    """Cuts text at the first stop sequence; fed piece by piece, it holds back a tail that could still start one.

    Streaming and non-streaming answers go through it, so both give the same text.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(stop, self.sent) for stop in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            held = max(
                (k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0
            )
            end = len(self.text) - held
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out = "" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out
