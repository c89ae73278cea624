"""Hard-negative mining with false-negative filtering: ``embedkit mine`` (see ``mining/miner.py``)."""
