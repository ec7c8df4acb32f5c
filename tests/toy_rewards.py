"""Cheap, deterministic rewards for the unit tests (no model needed)."""

import torch


class VowelShare:
    """Reward = share of vowels among the letters of the response (0 for no letters)."""

    name = "vowel-share"

    def score(self, prompts, responses):
        out = []
        for r in responses:
            letters = [c for c in r.lower() if c.isalpha()]
            out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
        return torch.tensor(out)
