"""FLOW step one: ``fastweight score`` (the scoring pass, ``run.py``), the scores file
(``files.py``) and ``fastweight weights`` (``summary.py``).

Only the scores-file API is imported here, which needs no torch at import time; the scoring pass
is ``fastweight.scoring.run.score``.
"""
from fastweight.scoring.files import SCORES_FORMAT, ScoresMismatchError, read_scores, write_scores

__all__ = ["read_scores", "write_scores", "ScoresMismatchError", "SCORES_FORMAT"]
