"""Vectorised seed ensembles: K independent members of one model trained in one process."""

from latentzoo.ensemble.members import Member, ensemble_requested, members_of
from latentzoo.ensemble.run import train_ensemble

__all__ = ["Member", "ensemble_requested", "members_of", "train_ensemble"]
