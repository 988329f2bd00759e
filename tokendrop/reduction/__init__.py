"""Token reduction: reducers (which tokens survive), schedules (how many), sites (where)."""

from .api import attach, aux_loss, detach, expected_patch_tokens, last_reduction, prepare_step, set_epoch, sites
from .base import Reducer, SiteInputs
from .schedules import Constant, Cosine, Curriculum, Linear, Schedule, Step, keep_count, make_schedule
from .state import SiteRecord, TokenState
from .topk import TopK

__all__ = [
    "Constant", "Cosine", "Curriculum", "Linear", "Reducer", "Schedule", "SiteInputs", "SiteRecord", "Step",
    "TokenState", "TopK", "attach", "aux_loss", "detach", "expected_patch_tokens", "keep_count", "last_reduction",
    "make_schedule", "prepare_step", "set_epoch", "sites",
]
