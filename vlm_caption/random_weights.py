"""Whether a run's captions come from random weights (the demo's tiny model), for the preview's banner.

The demo writes RANDOM_WEIGHTS_MARKER into its model dir. run.json records that dir by its absolute path, which
is gone once the demo dir is moved or copied elsewhere; it also records the dir's content (`model_identity`,
run_identity.py). So the model is looked for where it was, then where it moved with the checkpoint dir (a dir
of the same name beside the checkpoint dir or one of its parents, as the demo's DIR/model beside
DIR/checkpoints), and a dir found there counts only when its content is the run's model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError
from .run_identity import MODEL_IDENTITY, local_model_identity

# A file in a model dir saying its weights are random (the demo writes it next to its tiny model).
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"
NOISE_BANNER = ("These captions come from RANDOM WEIGHTS (the demo's tiny model): they are noise. The page shows that "
                "the pipeline runs, not what Gemma 3 writes; caption with a real model (e.g. google/gemma-3-4b-it) "
                "for real captions.")
_LEVELS_UP = 3  # parents of the checkpoint dir searched for the moved model dir


def is_random_weights(run: Mapping[str, Any], checkpoint_dir: Path) -> bool:
    """Whether the run's model (run.json's `model`) is a local dir marked as random weights, where it was
    recorded or where it moved along with `checkpoint_dir`."""
    model = run.get("model")
    if not isinstance(model, str) or not model:
        return False
    if (Path(model) / RANDOM_WEIGHTS_MARKER).is_file():
        return True
    identity = run.get(MODEL_IDENTITY)
    return isinstance(identity, str) and any(_same_model(d, identity) for d in _moved_model_dirs(Path(model),
                                                                                                 checkpoint_dir))


def _moved_model_dirs(model: Path, checkpoint_dir: Path) -> list[Path]:
    """Where the model dir would be now if it moved along with the checkpoint dir: its last one or two path
    parts under the checkpoint dir or one of its parents."""
    tails = [Path(*model.parts[-k:]) for k in (1, 2) if len(model.parts) > k]
    bases = [checkpoint_dir.absolute(), *checkpoint_dir.absolute().parents][:_LEVELS_UP + 1]
    return [base / tail for base in bases for tail in tails]


def _same_model(candidate: Path, identity: str) -> bool:
    if not (candidate / RANDOM_WEIGHTS_MARKER).is_file():
        return False
    try:
        return local_model_identity(candidate) == identity
    except UsageError:  # unreadable: not known to be the run's model
        return False
