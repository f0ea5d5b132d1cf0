"""N-gram (prompt lookup) proposals: the tokens that followed the sequence's last n tokens
the most recent earlier time they appeared, in its prompt or its output (torch-free).

No second model: on input-grounded work (rewriting, quoting, editing) the answer copies spans
of the prompt, and a match of the last few tokens predicts the next ones.
"""

from __future__ import annotations


def propose(seq: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the longest earlier match (n_min..n_max tokens) of the
    sequence's suffix; of equally long matches the most recent wins. [] when none matches."""
    size = len(seq)
    if k <= 0 or size <= n_min:
        return []
    last = seq[-1]
    candidates = []  # earlier positions of the last token (each followed by a token)
    i = -1
    try:
        while True:
            i = seq.index(last, i + 1, size - 1)
            candidates.append(i)
    except ValueError:
        pass
    best_len, best_end = 0, -1
    limit = min(n_max, size - 1)
    for end in reversed(candidates):
        n = 1
        while n < limit and n <= end and seq[end - n] == seq[size - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, end
            if n == limit:
                break
    if best_len < n_min:
        return []
    return seq[best_end + 1 : best_end + 1 + k]
