"""The command line prints what the user needs and nothing else.

Third-party notices that say nothing a user can act on (transformers' deprecation notes, bitsandbytes'
optional-kernel notice, the per-load "Loading weights" bar, Prefect's INFO lines and its telemetry) are
filtered here, at the command line's edge: importing dpo_eval as a library changes no filter. `--verbose`
leaves everything as the libraries print it. Environment variables the user set win (setdefault), and
processes the command starts (a served flow run) inherit them.
"""

from __future__ import annotations

import logging
import os
import warnings

ENVIRONMENT = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar follows huggingface_hub's switch
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}
NOTICES = (
    (FutureWarning, ""),
    (DeprecationWarning, ""),
    (UserWarning, r".*no word vectors loaded"),  # textdescriptives' coherence on spaCy's small models
)
# Silenced by source, not by sentence, so a reworded notice stays silent: bitsandbytes' "Failed to load CPU
# gemm_4bit_forward from kernels-community" (an optional kernel) and everything the `kernels` package logs
# ("Skipping publisher trust check ... offline mode", from kernels 0.19): no user can act on either offline.
QUIET_LOGGERS = ("bitsandbytes", "kernels")


def quiet() -> None:
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for category, message in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
