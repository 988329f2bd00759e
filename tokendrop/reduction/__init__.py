"""Token-reduction machinery: reducers (which tokens survive), schedules (how many), sites (where), and the
token state one forward pass carries through every block. It knows no method by name; methods live in
:mod:`tokendrop.methods` and register themselves."""

from .api import (add_extension, attach, aux_loss, capture_blockers, detach, expected_patch_tokens, extensions,
                  last_reduction, prepare_step, set_epoch, site_plans, sites, step_signature)
from .base import SITE_INPUTS, Reducer, SiteFacts, SiteInputs
from .registry import reducer, reducer_arguments, reducer_names, register_reducer
from .schedules import Constant, Cosine, Curriculum, Linear, Remove, Schedule, Step, keep_count, make_schedule
from .state import SiteRecord, TokenState

__all__ = [
    "SITE_INPUTS", "Constant", "add_extension", "extensions", "Cosine", "Curriculum", "Linear", "Reducer", "Schedule", "SiteFacts", "SiteInputs",
    "SiteRecord", "Step", "TokenState", "attach", "aux_loss", "detach", "expected_patch_tokens", "keep_count",
    "last_reduction", "make_schedule", "prepare_step", "reducer", "Remove", "reducer_arguments", "reducer_names",
    "register_reducer", "set_epoch", "site_plans", "sites", "capture_blockers", "step_signature",
]
