"""MMEB-V2: the versioned protocol (``protocol``), the leaderboard summary (``summary``) and the diff
against a published score file (``report``); the parsers and the runner evaluate it (docs/mmeb-v2.md)."""
