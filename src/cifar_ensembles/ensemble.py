"""Public API: combining ensemble members' class probabilities (`soft_vote`, `hard_vote`).

Kept at this import path for users; the implementation, with the subset and greedy curves
the workflow draws, lives in `analysis.votes`.
"""

from .analysis.votes import hard_vote, soft_vote, vote_counts

__all__ = ["hard_vote", "soft_vote", "vote_counts"]
